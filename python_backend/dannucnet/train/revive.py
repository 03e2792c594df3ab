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
    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name in dead}  # per channel: Σx, Σx², values per channel

    def recorder(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x, acc = inputs[0].double(), sums[name]
            acc[0] = acc[0] + x.sum((0, 2, 3))
            acc[1] = acc[1] + (x * x).sum((0, 2, 3))
            acc[2] += x.numel() // x.shape[1]
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
        total, squares, count = sums[name]
        if not count:  # the module never ran on these batches
            continue
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0) * count / max(count - 1, 1)
        bn = modules[name]
        bn.running_mean[mask] = mean[mask].to(bn.running_mean.dtype)
        bn.running_var[mask] = var[mask].to(bn.running_var.dtype)
        if bn.weight is not None:
            bn.weight[mask] = 0.0
        revived += int(mask.sum())
    return revived
