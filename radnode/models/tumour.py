"""Tumour segmentation for the processing chain: the RA-Seg network of a model bundle.

Which model ran is always part of the result (:class:`TumourSegmentation`), because every
output must name the model and version that produced it.

``models.segmentation_bundle`` selects the bundle: ``demo`` (the default) is the DEMO
bundle shipped in ``radnode/models/bundles/raseg-demo`` (trained by
``scripts/train_demo_segmentation.py``; every output says "demo — not for clinical use"),
a path is a user's bundle, and ``none`` turns the stage off: it then segments nothing and
says so, the chain still delivers the lungs, and the SR states that no tumour model ran.
A path may also be an nnU-Net v2 model folder or a MONAI bundle (:mod:`radnode.models.external`).

A weight-free outline of the detector's best candidate was tried for the no-model case and
rejected: on the synthetic phantom its best candidate was a hilar vessel bundle, and a
wrong GTV sent to a planning system is worse than none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from radnode.config.model import ModelSettings

if TYPE_CHECKING:
    from radnode.models.bundle import Bundle
    from radnode.models.quality import ContourQuality

log = logging.getLogger(__name__)

#: Method name recorded when no segmentation bundle is configured.
NO_MODEL = "none"
#: Setting value that selects the bundle shipped inside the package.
BUNDLED_DEMO = "demo"
#: Where the bundled DEMO model lives (written by scripts/train_demo_segmentation.py).
DEMO_BUNDLE_PATH = Path(__file__).with_name("bundles") / "raseg-demo"


def resolve_bundle(setting: str | Path | None) -> Path | None:
    """``models.segmentation_bundle`` → the bundle to load, or ``None`` for no tumour model.

    ``"demo"`` names the DEMO bundle shipped with radnode, ``"none"`` (or nothing) turns
    the tumour stage off, anything else is a path.
    """
    if setting is None or str(setting) == NO_MODEL:
        return None
    if str(setting) == BUNDLED_DEMO:
        return DEMO_BUNDLE_PATH
    return Path(setting)


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
    #: SHA-256 of the bundle (``BundleMeta.checksum``); empty when no model ran.
    checksum: str = ""
    #: Who made the bundle (``manufacturer`` in bundle.json, else radnode).
    manufacturer: str = "radnode"
    #: SHA-256 of the weights that ran (every output names it); None when no model ran.
    weights_sha256: str | None = None
    #: Format-specific provenance of an external model (radnode.models.external), for result.json.
    provenance: dict[str, object] = field(default_factory=dict)
    #: Lung labels (1 right, 2 left) when an external model also contours the lungs.
    lungs: np.ndarray | None = None
    quality: ContourQuality | None = None

    @property
    def uncertain(self) -> bool:
        """The contour scored below its model's quality threshold: a person must review it."""
        return self.quality is not None and self.quality.uncertain

    def summary(self) -> dict[str, object]:
        """JSON-friendly description for result.json."""
        quality: dict[str, Any] | None = None if self.quality is None else self.quality.to_dict()
        return {
            "method": self.method,
            "version": self.version,
            "demo": self.demo,
            "checksum": self.checksum,
            **({"weights_sha256": self.weights_sha256} if self.weights_sha256 else {}),
            **self.provenance,
            "voxels": int(np.count_nonzero(self.mask)),
            "notes": list(self.notes),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "quality": quality,
        }


def network_tumour(
    ct: sitk.Image, lung: np.ndarray, bundle_path: Path, device: str, expected_sha256: str | None = None
) -> TumourSegmentation:
    """Segment with the RA-Seg network of a bundle (checksum, pin and architecture verified)."""
    from radnode.models.bundle import load_bundle
    from radnode.models.inference import resolve_device

    bundle = load_bundle(bundle_path, device=resolve_device(device), expected_sha256=expected_sha256)
    return bundle_tumour(ct, lung, bundle, device)


def bundle_tumour(ct: sitk.Image, lung: np.ndarray, bundle: Bundle, device: str) -> TumourSegmentation:
    """The tumour path of a loaded bundle: network, post-processing and the contour's quality.

    Separate from loading so that the quality calibration can run a leave-one-out fold's
    network through exactly the chain's path, with the bundle's settings and calibration.
    """
    from radnode.models.inference import segment_ct
    from radnode.models.quality import UNCERTAIN_TEXT, assess_contour, calibration_for

    settings = bundle.inference_settings(device=device)
    seg = segment_ct(bundle.model, ct, lung.astype(np.uint8), settings=settings)
    meta = bundle.meta
    assert seg.case is not None
    quality = assess_contour(bundle.model, seg.case, seg.grid, settings,
                             calibration_for(meta.name, meta.version, bundle.path))
    seg.grid.timings["quality"] = quality.seconds
    if quality.uncertain:
        log.warning("%s: quality score %.2f below %.2f (%s)", UNCERTAIN_TEXT, quality.score,
                    quality.calibration.threshold, ", ".join(quality.reasons) or "overall")
    notes = [f"RA-Seg bundle {meta.name} {meta.version}"]
    if meta.demo:
        notes.append("DEMO model trained on synthetic phantoms and a handful of public CTs: not for clinical use")
        log.warning("tumour segmented by DEMO bundle %s %s: demo — not for clinical use", meta.name, meta.version)
    features = seg.grid.features
    return TumourSegmentation(
        mask=seg.mask.astype(bool),
        method=meta.name,
        version=meta.version,
        demo=meta.demo,
        notes=notes,
        timings=dict(seg.grid.timings),
        deep_features=None if features is None else [float(v) for v in features],
        checksum=meta.checksum,
        manufacturer=str(meta.extra.get("manufacturer") or "radnode"),
        weights_sha256=meta.weights_sha256,
        quality=quality,
    )


def segment_tumour(
    ct: sitk.Image,
    lung: np.ndarray,
    setting: str | Path | None,
    device: str = "auto",
    expected_sha256: str | None = None,
    models: ModelSettings | None = None,
) -> TumourSegmentation:
    """The chain's tumour stage: the configured bundle, else an empty, explained result.

    With ``models`` (the ``models`` settings section), a folder that is an nnU-Net v2 model
    or a MONAI bundle (``segmentation_format``, auto-detected by default) runs through
    :mod:`radnode.models.external` with the configured label map.
    """
    bundle_path = resolve_bundle(setting)
    if bundle_path is not None:
        if models is not None:
            from radnode.models.external import ExternalModelError, detect_format, external_tumour

            fmt = models.segmentation_format
            fmt = detect_format(bundle_path) if fmt == "auto" else fmt
            if fmt != "radnode":
                return external_tumour(ct, bundle_path, fmt, models, expected_sha256)
            if models.label_map:
                raise ExternalModelError(
                    f"{bundle_path}: a radnode bundle, but models.label_map is set (it applies to nnU-Net v2 and "
                    "MONAI models only); remove it or point segmentation_bundle at the external model"
                )
        return network_tumour(ct, lung, bundle_path, device, expected_sha256)
    log.warning("no segmentation bundle configured (models.segmentation_bundle = none): tumour not segmented")
    return TumourSegmentation(
        mask=np.zeros(lung.shape, dtype=bool),
        method=NO_MODEL,
        version="-",
        demo=False,
        notes=["no tumour model configured (models.segmentation_bundle = none): tumour not segmented"],
    )
