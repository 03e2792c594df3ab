"""DAN-NucNet: a UNet with residual encoder blocks and spatial-channel attention skips.

Follows the authors' released Keras graph (the "code" variant of
MODEL_SPEC.md): BatchNorm after ReLU, concatenating residual fusion, local
(not global) channel attention, transposed convolution *before* the attention
gate. Where the paper differs, a :class:`ModelConfig` switch selects it
(``channel_reduction=8``), and the paper's Table 5 ablations are switches too.

``forward`` returns logits; the spec's sigmoid head is applied by
:meth:`DANNucNet.probabilities` so that losses can use the numerically safe
logit form and bf16 autocast stays stable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # Keras BatchNormalization default
BN_MOMENTUM = 0.5  # Keras momentum 0.5 == PyTorch momentum 0.5 (1 - 0.5)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture switches; serialised into the model card."""

    base_filters: int = 32
    depth: int = 4
    channel_reduction: int = 16  # code: F/16; paper: F/8
    spatial_attention: bool = True
    channel_attention: bool = True
    block: str = "residual"  # "residual" (paper) or "plain" (ablation: two conv3 layers)
    bn_momentum: float = BN_MOMENTUM
    #: Not in the paper: a second output channel that predicts each nucleus's normalised distance
    #: to its own border (1 at its centre), from its own small branch beside the probability head.
    #: The paper's single probability gives no cue where two touching nuclei meet; this channel
    #: does. Off by default, so the paper's network stays exactly the paper's.
    distance_head: bool = False

    def __post_init__(self) -> None:
        if self.block not in ("residual", "plain"):
            raise ValueError(f"block must be 'residual' or 'plain', not {self.block!r}")
        if self.base_filters < self.channel_reduction:
            raise ValueError("base_filters must be at least channel_reduction")

    @property
    def outputs(self) -> int:
        """Output channels: the foreground logit, plus the distance logit when ``distance_head``."""
        return 2 if self.distance_head else 1

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this."""
        return 2**self.depth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        return cls(**data)


def _pad_br(x: torch.Tensor) -> torch.Tensor:
    """TF 'same' for a 2x2/stride-1 pool pads one row/column at the bottom/right
    and ignores it; replicate padding gives exactly the same avg and max."""
    return F.pad(x, (0, 1, 0, 1), mode="replicate")


def avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(_pad_br(x), kernel_size=2, stride=1)


def max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """Exactly ``F.max_pool2d(_pad_br(x), 2, stride=1)``, computed as two elementwise maxima of shifted views.

    PyTorch's CPU max-pool kernel is slow on channels-last tensors with few channels:
    at 32×256×256 it took 29 ms where the two maxima take 4.5 ms, and the attention
    gates run eight of these per window at full resolution (benchmarks/bench_model.py).
    """
    padded = _pad_br(x)
    across = torch.maximum(padded[..., :, :-1], padded[..., :, 1:])
    return torch.maximum(across[..., :-1, :], across[..., 1:, :])


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=momentum)


class ConvReluBN(nn.Sequential):
    """Conv → ReLU → BN, the literal order of the released graph."""

    def __init__(self, cin: int, cout: int, kernel: int, momentum: float) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2),
            nn.ReLU(inplace=True),
            _bn(cout, momentum),
        )


class ResidualBlock(nn.Module):
    """Eq. 1 as coded: a 1x1-3x3-1x1 path and a 1x1 shortcut, fused by concatenation + conv3."""

    def __init__(self, cin: int, filters: int, momentum: float) -> None:
        super().__init__()
        self.deep = nn.Sequential(
            ConvReluBN(cin, filters, 1, momentum),
            ConvReluBN(filters, filters, 3, momentum),
            ConvReluBN(filters, filters, 1, momentum),
        )
        self.shortcut = ConvReluBN(cin, filters, 1, momentum)
        self.fuse = nn.Conv2d(2 * filters, filters, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fuse(torch.cat([self.deep(x), self.shortcut(x)], dim=1)))


class PlainBlock(nn.Sequential):
    """Ablation: the residual block replaced by two plain conv3 layers."""

    def __init__(self, cin: int, filters: int, momentum: float) -> None:
        super().__init__(ConvReluBN(cin, filters, 3, momentum), ConvReluBN(filters, filters, 3, momentum))


class SpatialStream(nn.Module):
    """Eq. 3, one stream: local avg-then-max smoothing, 1x1 to one channel, 7x7."""

    def __init__(self, filters: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(filters, 1, 1)
        self.spread = nn.Conv2d(1, 1, 7, padding=3)

    def forward(self, averaged: torch.Tensor) -> torch.Tensor:
        """``averaged`` is ``avg_pool_same`` of the stream's input, shared with the channel stream."""
        return self.spread(self.squeeze(max_pool_same(averaged)))


class ChannelStream(nn.Module):
    """Eq. 2, one stream: local avg and max pools, each 1x1 to F/r, summed, then 1x1."""

    def __init__(self, filters: int, reduced: int) -> None:
        super().__init__()
        self.from_avg = nn.Conv2d(filters, reduced, 1)
        self.from_max = nn.Conv2d(filters, reduced, 1)
        self.mix = nn.Conv2d(reduced, reduced, 1)

    def forward(self, averaged: torch.Tensor, maximum: torch.Tensor) -> torch.Tensor:
        """The stream's input after ``avg_pool_same`` and after ``max_pool_same``."""
        return self.mix(self.from_avg(averaged) + self.from_max(maximum))


class AttentionDecoder(nn.Module):
    """Gate the encoder skip with per-pixel spatial and channel attention, then fuse with the decoder."""

    def __init__(self, filters: int, config: ModelConfig) -> None:
        super().__init__()
        self.spatial = config.spatial_attention
        self.channel = config.channel_attention
        if self.spatial:
            self.spatial_e = SpatialStream(filters)
            self.spatial_d = SpatialStream(filters)
        if self.channel:
            reduced = filters // config.channel_reduction
            self.channel_e = ChannelStream(filters, reduced)
            self.channel_d = ChannelStream(filters, reduced)
            self.channel_out = nn.Conv2d(reduced, filters, 1)
        self.fuse = ConvReluBN(2 * filters, filters, 3, config.bn_momentum)

    def forward(self, e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        refined = e
        if self.spatial or self.channel:
            # both streams read the same local averages of e and d: pool once, not twice
            e_avg, d_avg = avg_pool_same(e), avg_pool_same(d)
        if self.spatial:
            refined = refined * torch.sigmoid(self.spatial_e(e_avg) + self.spatial_d(d_avg))
        if self.channel:
            mixed = self.channel_e(e_avg, max_pool_same(e)) + self.channel_d(d_avg, max_pool_same(d))
            refined = refined * torch.sigmoid(self.channel_out(mixed))
        return self.fuse(torch.cat([refined, d], dim=1))


class UpSample(nn.Module):
    """Keras 'same' ConvTranspose(3, stride 2): PyTorch padding=0, last row/column cropped."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)[..., :-1, :-1]


class DANNucNet(nn.Module):
    """DAN-NucNet; input B×3×H×W RGB in [0, 1] (x/255), H and W multiples of 16; output logits B×1×H×W."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        widths = [c.base_filters * 2**i for i in range(c.depth)]
        block = ResidualBlock if c.block == "residual" else PlainBlock
        self.encoders = nn.ModuleList()
        cin = 3
        for w in widths:
            self.encoders.append(block(cin, w, c.bn_momentum))
            cin = w
        bottom = widths[-1] * 2
        self.bottleneck = nn.Sequential(
            nn.Conv2d(cin, bottom, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottom, bottom, 3, padding=1),
            nn.ReLU(inplace=True),
            _bn(bottom, c.bn_momentum),
        )
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        cin = bottom
        for w in reversed(widths):
            self.ups.append(UpSample(cin, w))
            self.decoders.append(AttentionDecoder(w, c))
            cin = w
        self.head = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, 1, 1),
        )
        # its own branch, so that it can be trained on a frozen, already trained network
        # (the second convolution is dilated: a nucleus's radius is up to ~30 px at 0.25 µm/px)
        self.distance = (
            nn.Sequential(
                nn.Conv2d(cin, cin, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(cin, cin, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
                nn.Conv2d(cin, 1, 1),
            )
            if c.distance_head else None
        )
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.config.stride
        if x.shape[-1] % stride or x.shape[-2] % stride:
            raise ValueError(f"input height and width must be multiples of {stride}, got {tuple(x.shape[-2:])}")
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(skip, up(x))
        if self.distance is None:
            return self.head(x)
        return torch.cat([self.head(x), self.distance(x)], dim=1)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The released graph's initialisers: glorot_normal (truncated) + bias 0.1 for block and
        attention convs, Keras defaults (glorot_uniform, bias 0) for transposed and head convs."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                _glorot_truncated_normal(module.weight)
                nn.init.constant_(module.bias, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.constant_(module.bias, 0.01)
                module.reset_running_stats()
        nn.init.zeros_(self.bottleneck[-1].bias)
        branch = [] if self.distance is None else list(self.distance.modules())
        for module in [*self.ups.modules(), *self.head.modules(), *branch]:
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)


def _glorot_truncated_normal(weight: torch.Tensor) -> None:
    fan_out, fan_in = weight.shape[0], weight.shape[1]
    receptive = weight[0, 0].numel()
    std = math.sqrt(2.0 / ((fan_in + fan_out) * receptive)) / 0.87962566103423978
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, BatchNorm running-stat elements) — Keras's split."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(
        b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))
    )
    return trainable, buffers
