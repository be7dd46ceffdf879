"""Check every configured model bundle before a job uses any of them.

A damaged, replaced or unpinned-but-altered bundle must stop the job with a reason that
names the bundle, before the job delivers anything -- not surface later as a missing
prediction in an SR that has already gone out. The checks read ``bundle.json`` /
``classifier.json`` and hash the weights or model file; nothing is deserialised, so this
is cheap enough to run at the start of every job (and it sees a bundle replaced while the
node runs).
"""

from __future__ import annotations

from pathlib import Path

from radnode.config.model import ModelSettings
from radnode.models.bundle import BundleError, verify_bundle
from radnode.models.classifiers.bundle import ClassifierBundleError, verify_classifier_bundle
from radnode.models.tumour import resolve_bundle


class ModelBundleError(RuntimeError):
    """A configured bundle failed its integrity checks; the message names it."""


def _is_radnode_bundle(path: Path, models: ModelSettings) -> bool:
    """nnU-Net and MONAI folders are checked (and pinned) by their adapter when it loads them."""
    from radnode.models.external import detect_format

    fmt = models.segmentation_format
    return (detect_format(path) if fmt == "auto" else fmt) == "radnode"


def verify_configured_bundles(models: ModelSettings) -> None:
    """Raise :class:`ModelBundleError` naming the first configured bundle that fails its checks."""
    seg = resolve_bundle(models.segmentation_bundle)
    if seg is not None and _is_radnode_bundle(seg, models):
        try:
            verify_bundle(seg, models.segmentation_sha256)
        except (BundleError, OSError) as exc:
            raise ModelBundleError(f"segmentation bundle {seg} (models.segmentation_bundle) is unusable: {exc}") from exc
    for endpoint, path in models.classifier_bundles.items():
        try:
            verify_classifier_bundle(path, models.classifier_sha256.get(endpoint))
        except (ClassifierBundleError, OSError) as exc:
            raise ModelBundleError(
                f"classifier bundle {path} for {endpoint} (models.classifier_bundles) is unusable: {exc}"
            ) from exc
