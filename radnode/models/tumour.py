"""Tumour segmentation for the processing chain: the RA-Seg network of a model bundle.

Which model ran is always part of the result (:class:`TumourSegmentation`), because every
output must name the model and version that produced it.

Without a configured bundle the stage segments nothing and says so: the chain still
delivers the lungs, and the SR states that no tumour model ran. A weight-free outline of
the detector's best candidate was tried for this case and rejected: on the synthetic
phantom its best candidate was a hilar vessel bundle, and a wrong GTV sent to a planning
system is worse than none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

log = logging.getLogger(__name__)

#: Method name recorded when no segmentation bundle is configured.
NO_MODEL = "none"


@dataclass
class TumourSegmentation:
    """A tumour mask on the CT grid and what produced it."""

    mask: np.ndarray  # bool (z, y, x)
    method: str
    version: str
    demo: bool
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    deep_features: list[float] | None = None

    def summary(self) -> dict[str, object]:
        """JSON-friendly description for result.json."""
        return {
            "method": self.method,
            "version": self.version,
            "demo": self.demo,
            "voxels": int(np.count_nonzero(self.mask)),
            "notes": list(self.notes),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


def network_tumour(ct: sitk.Image, lung: np.ndarray, bundle_path: Path, device: str) -> TumourSegmentation:
    """Segment with the RA-Seg network of a bundle (checksum and architecture verified)."""
    from radnode.models.bundle import load_bundle
    from radnode.models.inference import resolve_device, segment_ct

    bundle = load_bundle(bundle_path, device=resolve_device(device))
    seg = segment_ct(bundle.model, ct, lung.astype(np.uint8), settings=bundle.inference_settings(device=device))
    meta = bundle.meta
    return TumourSegmentation(
        mask=seg.mask.astype(bool),
        method=meta.name,
        version=meta.version,
        demo=meta.demo,
        notes=[f"RA-Seg bundle {bundle_path}"],
        timings=dict(seg.grid.timings),
    )


def segment_tumour(
    ct: sitk.Image, lung: np.ndarray, bundle_path: Path | None, device: str = "auto"
) -> TumourSegmentation:
    """The chain's tumour stage: the configured bundle, else an empty, explained result."""
    if bundle_path is not None:
        return network_tumour(ct, lung, bundle_path, device)
    log.warning("no segmentation bundle configured (models.segmentation_bundle): tumour not segmented")
    return TumourSegmentation(
        mask=np.zeros(lung.shape, dtype=bool),
        method=NO_MODEL,
        version="-",
        demo=False,
        notes=["no tumour model configured (models.segmentation_bundle): tumour not segmented"],
    )
