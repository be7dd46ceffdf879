"""An external model's lung labels in place of radnode's classical lung mask."""

from __future__ import annotations

import dataclasses

import numpy as np

from radnode.models.lungmask import LEFT_LUNG, RIGHT_LUNG, LungMaskResult


def replace_lungs(classical: LungMaskResult, labels: np.ndarray, spacing_zyx: tuple[float, float, float]) -> LungMaskResult:
    """``classical`` with the model's lung labels (1 right, 2 left) and their volumes.

    The classical VOI is kept: it is a search region for tumours, not a contour that is sent.
    """
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    return dataclasses.replace(
        classical,
        labels=labels.astype(np.uint8, copy=False),
        right_volume_ml=float(np.count_nonzero(labels == RIGHT_LUNG)) * voxel_ml,
        left_volume_ml=float(np.count_nonzero(labels == LEFT_LUNG)) * voxel_ml,
        notes=(*classical.notes, "lung labels replaced by the external segmentation model (models.label_map)"),
    )
