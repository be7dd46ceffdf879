"""RA-Seg's training augmentations and patch sampling, as MONAI dictionary transforms.

A sample is a dict of channel-first arrays on the 1 × 1 × 1.5 mm grid, spatial order
(z, y, x): ``image`` (1, D, H, W) float, ``label`` (1, D, H, W) 0/1, and after
:class:`BoxFromLabeld` ``bbox`` (1, D, H, W), the a2t module's box input.

The chain (:func:`training_transforms`):

1. pad to at least the patch size, then sample a patch centred on a tumour voxel with
   probability ``pos_fraction`` and on a background voxel otherwise
   (``RandCropByPosNegLabeld``): the tumour is a small part of the lung VOI, so uniform
   sampling would hardly ever show it;
2. the method's augmentations (``shared/papers/000`` §3.1): flips along each axis,
   rotation ±10° and shear ±10° in the axial plane (about the depth axis: the in-plane
   anatomy varies in orientation, while rotating out of plane would mix 1.5 mm slices
   into 1 mm rows), and depth scaling 0.9-1.1. Image and label share each random draw;
   the image is interpolated bilinearly (border values outside), the label by nearest
   neighbour (zeros outside), so they stay aligned voxel for voxel;
3. the box channel, computed **after** the geometry changed, from the augmented label:
   its bounding box grown by ``margin_mm`` (the detector's margin at inference) with every
   face moved by an independent random ``±jitter_mm``, so the network learns to use an
   imprecise box as it will get from the detector. A patch without tumour gets an empty
   box, as a sliding window beside the box does at inference.

Because the box is derived from the label last, it can never drift from it, whatever the
spatial transforms do.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    Randomizable,
    SpatialPadd,
)

from radnode.models.candidates import Box, box_from_mask, mm_to_voxels

IMAGE, LABEL, BBOX = "image", "label", "bbox"
#: Rotation and shear limits of the method (degrees).
MAX_ROTATION_DEG = 10.0
MAX_SHEAR_DEG = 10.0
#: Depth scaling range of the method.
DEPTH_SCALE = (0.9, 1.1)


class BoxFromLabeld(Randomizable, MapTransform):
    """Add the a2t box channel ``bbox`` from the (augmented) ``label`` (see the module docstring).

    Parameters
    ----------
    spacing_zyx
        Grid spacing (mm), to turn ``margin_mm`` and ``jitter_mm`` into voxels.
    margin_mm
        Margin around the label's bounding box.
    jitter_mm
        Each face of the box moves by an independent uniform integer number of voxels in
        ``[-jitter, +jitter]``; 0 disables the jitter.
    """

    def __init__(
        self,
        spacing_zyx: Sequence[float],
        margin_mm: float = 5.0,
        jitter_mm: float = 3.0,
        label_key: str = LABEL,
        box_key: str = BBOX,
    ) -> None:
        MapTransform.__init__(self, [label_key])
        self.spacing_zyx = tuple(float(s) for s in spacing_zyx)
        self.margin_mm = float(margin_mm)
        self.jitter = mm_to_voxels(jitter_mm, self.spacing_zyx) if jitter_mm > 0 else (0, 0, 0)
        self.label_key, self.box_key = label_key, box_key
        self._shift = np.zeros((2, 3), dtype=int)

    def randomize(self, data: Any = None) -> None:
        jitter = np.asarray(self.jitter)
        self._shift = np.stack([self.R.randint(-jitter, jitter + 1) for _ in range(2)])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = np.asarray(torch.as_tensor(d[self.label_key]).detach().cpu().numpy())[0] != 0
        self.randomize()
        box_mask = np.zeros((1, *label.shape), dtype=np.float32)
        box = box_from_mask(label, self.spacing_zyx, self.margin_mm)
        if box is not None:
            start = np.clip(np.asarray(box.start) + self._shift[0], 0, np.asarray(label.shape) - 1)
            stop = np.clip(np.asarray(box.stop) + self._shift[1], start + 1, label.shape)
            box_mask[(0, *(slice(int(a), int(b)) for a, b in zip(start, stop)))] = 1.0
        d[self.box_key] = torch.from_numpy(box_mask)
        return d


def spatial_augmentations(keys: KeysCollection = (IMAGE, LABEL), prob: float = 0.5) -> list[MapTransform]:
    """Flips, in-plane rotation and shear, depth scaling (the method's list), image + label.

    ``keys`` must be (image, label): the first is interpolated bilinearly with border
    padding, the second by nearest neighbour with zero padding.
    """
    keys = list(keys)
    shear = math.tan(math.radians(MAX_SHEAR_DEG))
    return [
        *(RandFlipd(keys, prob=prob, spatial_axis=axis) for axis in range(3)),
        RandAffined(
            keys,
            prob=prob,
            # Spatial axis 0 is depth (z): rotation about it and the (y, x) shear
            # coefficients (indices 3 and 5 of MONAI's 3-D shear) stay in the axial plane.
            rotate_range=(math.radians(MAX_ROTATION_DEG), 0.0, 0.0),
            shear_range=(0.0, 0.0, 0.0, shear, 0.0, shear),
            scale_range=((DEPTH_SCALE[0] - 1.0, DEPTH_SCALE[1] - 1.0), 0.0, 0.0),
            mode=("bilinear", "nearest"),
            padding_mode=("border", "zeros"),
        ),
    ]


def training_transforms(
    patch_size: Sequence[int],
    spacing_zyx: Sequence[float],
    *,
    pos_fraction: float = 0.67,
    augment: bool = True,
    augment_prob: float = 0.5,
    margin_mm: float = 5.0,
    jitter_mm: float = 3.0,
) -> Compose:
    """The whole training chain of the module docstring, for one sample per call.

    Returns a ``Compose`` whose output is a one-element list (MONAI's patch samplers
    return lists); seed it with ``set_random_state``.
    """
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction: must be in [0, 1], got {pos_fraction}")
    patch = tuple(int(p) for p in patch_size)
    steps: list[Any] = [
        EnsureTyped([IMAGE, LABEL], data_type="tensor", track_meta=False),
        SpatialPadd([IMAGE, LABEL], spatial_size=patch, mode="constant"),
        RandCropByPosNegLabeld(
            [IMAGE, LABEL], label_key=LABEL, spatial_size=patch,
            pos=pos_fraction, neg=1.0 - pos_fraction, num_samples=1,
        ),
    ]
    if augment:
        steps.extend(spatial_augmentations((IMAGE, LABEL), augment_prob))
    steps.append(BoxFromLabeld(spacing_zyx, margin_mm, jitter_mm))
    return Compose(steps)


def sample_dict(image: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """A (z, y, x) image and label as the channel-first dict the transforms take."""
    return {IMAGE: np.asarray(image, dtype=np.float32)[None], LABEL: np.asarray(label, dtype=np.float32)[None]}


def negative_sample(
    image: np.ndarray,
    label: np.ndarray,
    box: Box,
    patch_size: Sequence[int],
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """A hard-negative sample: a patch around a detector box that holds no tumour.

    The box channel marks ``box`` (the detector's proposal, as at inference) and the label
    is the reference inside the patch (normally all background), so the network learns
    that a box is a hint, not an order. The patch centre is shifted by up to a quarter
    of the patch so that the box is not always in the middle; random flips along each
    axis as in the positive chain. (z, y, x) arrays in, channel-first tensors out.
    """
    patch = np.asarray([int(p) for p in patch_size])
    shape = np.asarray(image.shape)
    padded_shape = np.maximum(shape, patch)
    pad = [(0, int(p - s)) for p, s in zip(padded_shape, shape)]
    img = np.pad(np.asarray(image, dtype=np.float32), pad, mode="edge")
    lab = np.pad(np.asarray(label, dtype=np.float32), pad)
    box_mask = np.pad(box.mask(image.shape).astype(np.float32), pad)
    centre = (np.asarray(box.start) + np.asarray(box.stop)) / 2 + rng.uniform(-0.25, 0.25, 3) * patch
    start = np.clip(np.round(centre - patch / 2).astype(int), 0, padded_shape - patch)
    window = tuple(slice(int(a), int(a + p)) for a, p in zip(start, patch))
    arrays = [img[window], lab[window], box_mask[window]]
    for axis in range(3):
        if rng.random() < 0.5:
            arrays = [np.flip(a, axis) for a in arrays]
    return {key: torch.from_numpy(np.ascontiguousarray(a)[None]) for key, a in zip((IMAGE, LABEL, BBOX), arrays)}
