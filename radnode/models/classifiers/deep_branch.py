"""Deep branch of Deep-RadScore: DenseNet121 on the tumour crop, RadScores fused before the last FC.

Architecture (``shared/papers/001``, Step 2 and Fig. 1): MONAI's
:class:`~monai.networks.nets.DenseNet121` with ``spatial_dims=2`` encodes a 160 × 160 crop
centred on the tumour at its largest axial slice; its 1000-way head is replaced by two
fully connected layers with Xavier-initialised weights. The output of the first (the
*penultimate* layer of the network) is the deep-feature vector; the tumour and ring
RadScores are concatenated to it, so the last FC layer classifies deep features and
RadScores together.

The paper starts from ImageNet weights; radnode never downloads anything, so the
backbone starts from MONAI's default initialisation unless a state dict is loaded.
This module imports torch and MONAI; :mod:`radnode.models.classifiers.method_b` does not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.nets import DenseNet121
from torch import nn

logger = logging.getLogger(__name__)

#: Width of the penultimate FC layer (the deep-feature vector).
DEFAULT_HIDDEN = 128
#: Smallest crop side DenseNet121 accepts (total stride 32).
MIN_CROP = 32


class DeepRadScoreNet(nn.Module):
    """DenseNet121 (2-D) → FC → [deep features ‖ RadScores] → FC → class logits.

    Parameters
    ----------
    n_classes
        Output classes (2 for a binary endpoint).
    n_radscores
        RadScores fused at the penultimate layer (2: tumour and ring; 0 for the deep
        branch alone).
    hidden
        Width of the penultimate FC layer.
    dropout
        Dropout on the deep features before fusion.
    """

    def __init__(self, n_classes: int = 2, n_radscores: int = 2, hidden: int = DEFAULT_HIDDEN,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if n_classes < 2 or n_radscores < 0 or hidden < 1:
            raise ValueError(f"need n_classes >= 2, n_radscores >= 0, hidden >= 1; got {n_classes}, "
                             f"{n_radscores}, {hidden}")
        self.n_radscores = n_radscores
        self.backbone = DenseNet121(spatial_dims=2, in_channels=1, out_channels=1)
        width = self.backbone.class_layers.out.in_features
        self.backbone.class_layers.out = nn.Identity()  # the 1000-way head is replaced
        self.fc1 = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.fc2 = nn.Linear(hidden + n_radscores, n_classes)
        for layer in (self.fc1[0], self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def deep_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer output ``(B, hidden)`` for crops ``(B, 1, H, W)``."""
        if crops.ndim != 4 or crops.shape[1] != 1:
            raise ValueError(f"crops must be (B, 1, H, W), got {tuple(crops.shape)}")
        if min(crops.shape[-2:]) < MIN_CROP:
            raise ValueError(f"crops must be at least {MIN_CROP} pixels on each side, got {tuple(crops.shape[-2:])}")
        return self.fc1(self.backbone(crops))

    def forward(self, crops: torch.Tensor, radscores: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``(B, n_classes)``; ``radscores`` is ``(B, n_radscores)``."""
        feats = self.deep_features(crops)
        if self.n_radscores:
            if radscores is None or tuple(radscores.shape) != (crops.shape[0], self.n_radscores):
                got = None if radscores is None else tuple(radscores.shape)
                raise ValueError(f"radscores must be ({crops.shape[0]}, {self.n_radscores}), got {got}")
            feats = torch.cat([feats, radscores.to(feats.dtype)], dim=1)
        return self.fc2(feats)


def hu_window(crops: np.ndarray, low: float = -1000.0, high: float = 400.0) -> np.ndarray:
    """Scale HU crops to [0, 1] in a lung-and-soft-tissue window (float32)."""
    c = (np.asarray(crops, dtype=np.float32) - low) / (high - low)
    return np.clip(c, 0.0, 1.0)


@dataclass(frozen=True)
class TrainingHistory:
    """Mean training loss per epoch."""

    losses: tuple[float, ...]


def train_deep_radscore(
    model: DeepRadScoreNet,
    crops: np.ndarray,
    radscores: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> TrainingHistory:
    """Train with Adam and cross-entropy on windowed crops (a small loop, not a recipe).

    Parameters
    ----------
    model
        The network (trained in place).
    crops
        ``(N, H, W)`` HU crops (windowed here with :func:`hu_window`).
    radscores
        ``(N, n_radscores)`` RadScores (from a :class:`~radnode.models.classifiers.method_b.RadScoreTransformer`
        fitted on the same training cases).
    labels
        ``(N,)`` class indices.
    """
    if len(crops) != len(labels) or len(radscores) != len(labels):
        raise ValueError(f"{len(crops)} crops, {len(radscores)} radscore rows and {len(labels)} labels differ")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(hu_window(crops))[:, None]
    r = torch.as_tensor(np.asarray(radscores, dtype=np.float32)).reshape(len(labels), -1)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples in training mode
                continue
            optimiser.zero_grad()
            loss = loss_fn(model(x[idx].to(device), r[idx].to(device)), y[idx].to(device))
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(y))
        logger.debug("deep radscore epoch %d: loss %.4f", epoch + 1, losses[-1])
    model.eval()
    return TrainingHistory(tuple(losses))


@torch.no_grad()
def predict_deep_radscore(model: DeepRadScoreNet, crops: np.ndarray, radscores: np.ndarray,
                          device: str | torch.device = "cpu") -> np.ndarray:
    """Class probabilities ``(N, n_classes)`` (softmax of the logits, eval mode)."""
    model.to(device).eval()
    x = torch.from_numpy(hu_window(crops))[:, None].to(device)
    r = torch.as_tensor(np.asarray(radscores, dtype=np.float32)).reshape(len(x), -1).to(device)
    return torch.softmax(model(x, r), dim=1).cpu().numpy()
