"""Splitting region extractions into image-type parts that keep two cores busy.

Why
---
With the per-region profiles the whole lung costs about three times the tumour and ring
together, so one process per region leaves a core idle most of the time (measured: 1.4×
over serial instead of the issue's 1.8×). pyradiomics computes each image type (original,
each LoG sigma, the wavelet set, square, ...) independently from the same preprocessed
image and mask, so a region's image types can be divided into *parts*, each run as its
own pyradiomics extraction, and the parts' features merged: the values are the very same
numbers (each part repeats the identical, deterministic preprocessing), only the order of
the keys has to be restored (:func:`canonical_order`). The shape class, which does not
depend on the image type, goes with the part holding ``Original``.

The cost model only has to rank work, not predict seconds: a unit of work per image type
(a LoG sigma 1, the 8 wavelet decompositions 8, LBP-3D's three images 4) times a fixed
overhead plus a term linear in the region's voxel count on the resampled grid, calibrated
on this machine (about 0.14 s + 2.2 µs per voxel per image type).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Work of each image type relative to the original image (per derived image computed).
_IMAGE_TYPE_WEIGHT = {"Wavelet": 8.0, "LBP3D": 4.0}
#: Voxels on the resampled grid at which the per-voxel cost equals the fixed overhead.
_VOXELS_PER_OVERHEAD = 60_000.0
#: Feature-name prefixes of each pyradiomics image type (``<prefix>_<class>_<feature>``).
_PREFIXES = {
    "Original": ("original",),
    "LoG": ("log-sigma-",),
    "Wavelet": ("wavelet-",),
    "Square": ("square",),
    "SquareRoot": ("squareroot",),
    "Logarithm": ("logarithm",),
    "Exponential": ("exponential",),
    "Gradient": ("gradient",),
    "LBP2D": ("lbp-2D",),
    "LBP3D": ("lbp-3D-",),
}
#: Image types radnode computes after pyradiomics' own loop (their features come last).
_AFTER_PYRADIOMICS = ("LBP3D",)


def image_type_weight(name: str, custom: Mapping[str, Any] | None) -> float:
    """Relative work of one image type (a LoG counts once per sigma)."""
    if name == "LoG":
        sigma = (custom or {}).get("sigma", [])
        return float(max(1, len(sigma) if isinstance(sigma, (list, tuple)) else 1))
    return _IMAGE_TYPE_WEIGHT.get(name, 1.0)


def resampled_voxels(voxels: int, spacing_xyz: Sequence[float], settings: Mapping[str, Any]) -> float:
    """Region voxels after the profile's resampling (pyradiomics keeps a spacing given as 0)."""
    target = settings.get("resampledPixelSpacing")
    if not target or settings.get("interpolator") is None:
        return float(voxels)
    new = [t if t else s for t, s in zip(target, spacing_xyz)]
    return voxels * math.prod(spacing_xyz) / math.prod(new)


def unit_costs(params: Mapping[str, Any], voxels: float) -> dict[str, float]:
    """Estimated cost of each enabled image type of a profile for a region of ``voxels``."""
    scale = 1.0 + voxels / _VOXELS_PER_OVERHEAD
    types = params.get("imageType") or {}
    return {name: image_type_weight(name, custom) * scale for name, custom in types.items()}


def plan_parts(costs: Mapping[str, Mapping[str, float]], workers: int) -> dict[str, list[list[str]]]:
    """Region → parts (lists of image types), so that no part dwarfs a worker's fair share.

    A region is split into ``ceil(cost / share - 0.2)`` parts (at least 1, at most one
    per image type), ``share`` being the total cost over ``workers``; its image types are
    dealt heaviest first to the lightest part. With one worker nothing is split.
    """
    total = sum(sum(c.values()) for c in costs.values())
    plan: dict[str, list[list[str]]] = {}
    for region, region_costs in costs.items():
        names = list(region_costs)
        if workers <= 1 or total <= 0 or len(names) <= 1:
            plan[region] = [names]
            continue
        share = total / workers
        n_parts = max(1, min(len(names), math.ceil(sum(region_costs.values()) / share - 0.2)))
        parts: list[list[str]] = [[] for _ in range(n_parts)]
        loads = [0.0] * n_parts
        for name in sorted(names, key=lambda n: -region_costs[n]):
            lightest = loads.index(min(loads))
            parts[lightest].append(name)
            loads[lightest] += region_costs[name]
        # Keep each part's image types in the profile's order.
        plan[region] = [[n for n in names if n in part] for part in parts if part]
    return plan


def image_type_of(feature: str) -> str | None:
    """The image type that produced ``feature`` (``None`` for shape features)."""
    prefix = feature.split("_", 1)[0]
    if feature.startswith(("original_shape_", "original_shape2D_")):
        return None
    for name, prefixes in _PREFIXES.items():
        if any(prefix == p or (p.endswith("-") and prefix.startswith(p)) for p in prefixes):
            return name
    raise ValueError(f"feature {feature!r} does not start with a known pyradiomics image type")


def canonical_order(keys: Iterable[str], image_types: Sequence[str]) -> list[str]:
    """Feature keys in the order one unsplit extraction produces them.

    Shape first, then the image types in the profile's order, radnode's own image types
    (LBP-3D) last; within an image type the order the keys came in.
    """
    order = [t for t in image_types if t not in _AFTER_PYRADIOMICS] + [t for t in image_types if t in _AFTER_PYRADIOMICS]
    rank = {name: i + 1 for i, name in enumerate(order)}
    keyed = [(rank.get(image_type_of(k) or "", 0), i, k) for i, k in enumerate(keys)]
    return [k for _, _, k in sorted(keyed)]
