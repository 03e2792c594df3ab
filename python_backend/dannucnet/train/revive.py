"""Give BatchNorm channels whose stored variance overflowed to inf their statistics back.

Models written before ``save_model`` kept large tensors in fp32 stored every BatchNorm variance in
fp16, whose range ends at 65504; the bottleneck's variances reach 10⁵, so those channels were loaded
with an infinite variance and have output their bias ever since, whatever the image. Fine-tuning
cannot fix that by itself (a running variance of inf stays inf). Here each such channel gets its
statistics measured on training batches and its scale set to 0: the network computes exactly what
it did before, and training can grow the scale and use the channel again.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dannucnet.model.weights import overflowed_channels


@torch.no_grad()
def revive_overflowed_channels(network: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-measure the statistics of overflowed BatchNorm channels and zero their scale; return how many.

    Statistics are taken in eval mode, the way the network runs at inference, so every other
    layer (and so what flows into these channels) stays as it is.
    """
    dead = overflowed_channels(network)
    if not dead:
        return 0
    modules = dict(network.named_modules())
    sums: dict[str, list[torch.Tensor]] = {}

    def recorder(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double()
            dims = (0, 2, 3)
            total = sums.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)] * 2 + [0])
            sums[name] = [total[0] + x.sum(dims), total[1] + (x * x).sum(dims), total[2] + x.numel() // x.shape[1]]
        return record

    handles = [modules[name].register_forward_pre_hook(recorder(name)) for name in dead]
    was_training = network.training
    network.eval()
    try:
        for x in batches:
            network(x)
    finally:
        for handle in handles:
            handle.remove()
        network.train(was_training)
    revived = 0
    for name, mask in dead.items():
        if name not in sums:
            continue
        total, squares, count = sums[name]
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0) * count / max(count - 1, 1)
        bn = modules[name]
        bn.running_mean[mask] = mean[mask].to(bn.running_mean.dtype)
        bn.running_var[mask] = var[mask].to(bn.running_var.dtype)
        if bn.weight is not None:
            bn.weight[mask] = 0.0
        revived += int(mask.sum())
    return revived
