"""RA-Seg: the recurrent-attention 3-D U-Net for lung tumour segmentation.

The method (``shared/papers/000``, "Recurrent-Attention Segmentor") takes MONAI's U-Net as
its backbone and adds two modules:

* a **recurrent block** of three ConvLSTM layers (3×3 kernels) at the bottleneck, run over
  the depth axis: the depth slices of the bottleneck feature map are the time steps of the
  sequence, so information travels from one CT slice to the next the way a reader scrolls
  through a stack;
* an **attention-to-tumour (a2t) module** on every skip connection of the decoder,
  ``f_out = f_in + sigmoid(Conv(b)) * f_in`` (paper eq. 1), where ``b`` is a 3-D box mask of
  the tumour candidate resized to that stage. The product suppresses features outside the
  box; the shortcut re-introduces them, so the box guides rather than gates.

``monai.networks.nets.UNet`` is built as nested ``Sequential``/``SkipConnection`` blocks with
no place to hook either module, so this file lays out the same encoder/decoder explicitly
from MONAI's own building blocks (:class:`~monai.networks.blocks.ResidualUnit`,
:class:`~monai.networks.blocks.Convolution`), layer for layer as ``UNet`` would build it
for the same arguments (strided residual encoder units, a stride-1 bottom unit, transposed
convolution + one-subunit residual unit per decoder stage, skip features concatenated
first). InstanceNorm, PReLU and *spatial* dropout 0.1 (the paper's wording; MONAI's
``dropout_dim=3``) as in the paper.

Inputs are ``image`` (B, 1, D, H, W) and ``bbox`` (B, 1, D, H, W); the output is the logits
(B, ``out_channels``, D, H, W). Any spatial size works: the input is zero-padded at the far
end to a multiple of the total stride (and to at least two bottleneck voxels per axis)
and the logits are cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

#: Name written to and checked in a bundle's ``architecture.name``.
ARCHITECTURE_NAME = "RA-Seg"

#: Channels of the published configuration (encoder features 64-128-256-512).
FAITHFUL_CHANNELS = (64, 128, 256, 512)


@dataclass(frozen=True)
class RASegConfig:
    """Architecture parameters; what a bundle stores under ``architecture``.

    Attributes
    ----------
    in_channels, out_channels
        Image channels in (1: CT) and classes out (2: background, tumour).
    channels
        Feature channels per level; the last one is the bottleneck. At least 3 levels, so
        that a second-last decoder stage exists for the deep-feature hook.
    strides
        Down-sampling stride per encoder level; ``len(channels) - 1`` entries.
    num_res_units
        Convolutions per encoder residual unit (MONAI ``UNet`` semantics; >= 1).
    kernel_size, up_kernel_size
        Convolution kernels of the residual units and of the transposed convolutions.
    dropout
        Spatial dropout rate (the paper's 0.1).
    convlstm_layers, convlstm_kernel
        Depth and 2-D kernel of the recurrent block; 0 layers disables it (ablation).
    attention
        Whether the a2t module recalibrates the skip connections (ablation switch).
    """

    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = FAITHFUL_CHANNELS
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    kernel_size: int = 3
    up_kernel_size: int = 3
    dropout: float = 0.1
    convlstm_layers: int = 3
    convlstm_kernel: int = 3
    attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if len(self.channels) < 3:
            raise ValueError(
                f"channels: need at least 3 levels (got {list(self.channels)}), so that a "
                "second-last decoder stage exists for the deep features"
            )
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides: need len(channels) - 1 = {len(self.channels) - 1} entries, "
                f"got {list(self.strides)}"
            )
        for name in ("in_channels", "out_channels", "num_res_units", "kernel_size", "up_kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if any(c < 1 for c in self.channels) or any(s < 1 for s in self.strides):
            raise ValueError("channels and strides must be positive integers")
        if self.kernel_size % 2 == 0 or self.convlstm_kernel % 2 == 0:
            raise ValueError("kernel_size and convlstm_kernel must be odd (same padding)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.convlstm_layers < 0:
            raise ValueError(f"convlstm_layers: must be >= 0, got {self.convlstm_layers}")

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (product of the strides)."""
        return math.prod(self.strides)

    @property
    def feature_channels(self) -> int:
        """Channels of the second-last decoder stage (the deep-feature vector length)."""
        return self.channels[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping including ``name``, as stored in ``bundle.json``."""
        data = asdict(self)
        data["channels"] = list(self.channels)
        data["strides"] = list(self.strides)
        return {"name": ARCHITECTURE_NAME, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RASegConfig:
        """Build from a ``bundle.json`` mapping; unknown keys and a wrong name raise ``ValueError``.

        The messages name the offending key so that :mod:`radnode.models.bundle` can point
        at ``architecture.<key>``.
        """
        values = dict(data)
        name = values.pop("name", ARCHITECTURE_NAME)
        if name != ARCHITECTURE_NAME:
            raise ValueError(f"name: this build knows {ARCHITECTURE_NAME!r}, got {name!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown architecture parameter (known: {sorted(known)})")
        for key in ("channels", "strides"):
            if key in values and not isinstance(values[key], Sequence):
                raise ValueError(f"{key}: must be a list of integers, got {values[key]!r}")
        return cls(**values)


class ConvLSTMCell2d(nn.Module):
    """One 2-D ConvLSTM cell (Shi et al. 2015) with ``hidden = channels`` state.

    The gate convolution over ``[x, h]`` is split into an input part (with bias), applied
    to all time steps at once, and a recurrent part applied step by step; the sum is the
    same convolution as over the concatenation, at a fraction of the sequential cost.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.hidden_channels = hidden_channels
        self.input_conv = nn.Conv2d(in_channels, 4 * hidden_channels, kernel_size, padding=pad)
        self.hidden_conv = nn.Conv2d(hidden_channels, 4 * hidden_channels, kernel_size, padding=pad, bias=False)
        with torch.no_grad():  # forget-gate bias 1: remember by default, the usual LSTM start
            self.input_conv.bias.zero_()
            self.input_conv.bias[hidden_channels : 2 * hidden_channels].fill_(1.0)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        """Run over ``sequence`` (B, T, C, H, W) from t = 0; return hidden states (B, T, hidden, H, W)."""
        b, t, c, h, w = sequence.shape
        x_gates = self.input_conv(sequence.reshape(b * t, c, h, w)).reshape(b, t, 4 * self.hidden_channels, h, w)
        hidden = sequence.new_zeros(b, self.hidden_channels, h, w)
        cell = torch.zeros_like(hidden)
        outputs = []
        for step in range(t):
            gates = x_gates[:, step] + self.hidden_conv(hidden)
            i, f, g, o = gates.chunk(4, dim=1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            hidden = torch.sigmoid(o) * torch.tanh(cell)
            outputs.append(hidden)
        return torch.stack(outputs, dim=1)


class RecurrentBlock(nn.Module):
    """Stacked ConvLSTM layers over the depth axis of a (B, C, D, H, W) feature map.

    Depth slice ``d`` is time step ``d``: the state after slice ``d`` has seen slices
    ``0..d`` (unidirectional, as in the paper's Recurrent 3D-DenseUNet source).
    """

    def __init__(self, channels: int, layers: int = 3, kernel_size: int = 3) -> None:
        super().__init__()
        self.cells = nn.ModuleList(ConvLSTMCell2d(channels, channels, kernel_size) for _ in range(layers))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not len(self.cells):
            return features
        sequence = features.permute(0, 2, 1, 3, 4)  # (B, D, C, H, W): depth is time
        for cell in self.cells:
            sequence = cell(sequence)
        return sequence.permute(0, 2, 1, 3, 4).contiguous()


class TumourAttention(nn.Module):
    """Attention-to-tumour (a2t) module: ``f_out = f_in + sigmoid(Conv(b)) * f_in``.

    ``b`` is the full-resolution box mask; it is area-averaged down to the stage's spatial
    size (so a box edge inside a coarse voxel gives a fractional value) before a 3-D
    convolution maps it to one weight map per feature channel.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, features: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        box = bbox.to(features.dtype)
        if box.shape[2:] != features.shape[2:]:
            box = F.adaptive_avg_pool3d(box, features.shape[2:])
        return features + torch.sigmoid(self.conv(box)) * features


class RASeg(nn.Module):
    """RA-Seg network (see the module docstring).

    Parameters
    ----------
    config
        Architecture; the default is the published configuration.

    Attributes
    ----------
    encoders, bottom, recurrent, decoders, attention
        The stages; ``decoders[0]`` is the last (full-resolution, logits) stage.
    feature_stage
        The second-last decoder stage, ``decoders[1]``; register a forward hook on it to
        read the deep features (``config.feature_channels`` channels).
    """

    def __init__(self, config: RASegConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or RASegConfig()
        common: dict[str, Any] = {
            "act": "PRELU",
            "norm": "INSTANCE",
            "dropout": cfg.dropout,
            "dropout_dim": 3,
        }
        levels = len(cfg.strides)
        self.encoders = nn.ModuleList()
        in_ch = cfg.in_channels
        for level in range(levels):
            self.encoders.append(
                ResidualUnit(
                    3, in_ch, cfg.channels[level], strides=cfg.strides[level],
                    kernel_size=cfg.kernel_size, subunits=cfg.num_res_units, **common,
                )
            )
            in_ch = cfg.channels[level]
        self.bottom = ResidualUnit(
            3, cfg.channels[-2], cfg.channels[-1], strides=1,
            kernel_size=cfg.kernel_size, subunits=cfg.num_res_units, **common,
        )
        self.recurrent = RecurrentBlock(cfg.channels[-1], cfg.convlstm_layers, cfg.convlstm_kernel)
        self.decoders = nn.ModuleList()
        for level in range(levels):
            below = cfg.channels[-1] if level == levels - 1 else cfg.channels[level]
            out_ch = cfg.out_channels if level == 0 else cfg.channels[level - 1]
            self.decoders.append(
                self._up_stage(cfg.channels[level] + below, out_ch, cfg.strides[level], level == 0, common)
            )
        self.attention = nn.ModuleList(
            TumourAttention(cfg.channels[level]) for level in range(levels)
        ) if cfg.attention else None

    def _up_stage(self, in_ch: int, out_ch: int, stride: int, is_top: bool, common: dict[str, Any]) -> nn.Sequential:
        up = Convolution(
            3, in_ch, out_ch, strides=stride, kernel_size=self.config.up_kernel_size,
            is_transposed=True, **common,
        )
        refine = ResidualUnit(
            3, out_ch, out_ch, strides=1, kernel_size=self.config.kernel_size, subunits=1,
            last_conv_only=is_top, **common,
        )
        return nn.Sequential(up, refine)

    def padded_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """Spatial size the input is zero-padded to: a multiple of the total stride, and at
        least two bottleneck voxels per axis (InstanceNorm needs more than one value)."""
        div = self.config.divisor
        return tuple(max(-(-s // div) * div, 2 * div) for s in size)

    @property
    def feature_stage(self) -> nn.Module:
        """Second-last decoder stage (``config.feature_channels`` outputs), for forward hooks."""
        return self.decoders[1]

    def forward(self, image: torch.Tensor, bbox: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, out_channels, D, H, W) for ``image`` guided by the box mask ``bbox``.

        ``bbox`` defaults to all ones (no localisation prior: every voxel "in the box").
        """
        if image.ndim != 5 or image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"image: expected (B, {self.config.in_channels}, D, H, W), got {tuple(image.shape)}"
            )
        if bbox is None:
            bbox = torch.ones_like(image[:, :1])
        if bbox.ndim != 5 or bbox.shape[:2] != (image.shape[0], 1) or bbox.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"bbox: expected (B, 1, D, H, W) matching image {tuple(image.shape)}, got {tuple(bbox.shape)}"
            )
        size = tuple(image.shape[2:])
        padded = self.padded_size(size)
        pad = [p for s, t in zip(reversed(size), reversed(padded)) for p in (0, t - s)]
        if any(pad):
            image = F.pad(image, pad)
            bbox = F.pad(bbox, pad)

        skips = []
        x = image
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = self.recurrent(self.bottom(x))
        for level in reversed(range(len(self.decoders))):
            skip = skips[level]
            if self.attention is not None:
                skip = self.attention[level](skip, bbox)
            x = self.decoders[level](torch.cat([skip, x], dim=1))
        return x[:, :, : size[0], : size[1], : size[2]]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
