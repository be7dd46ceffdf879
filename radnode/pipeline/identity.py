"""What a node and its workers compare before a job runs: chain version and model checksum.

A job is enqueued with the node's pipeline version (:mod:`radnode.pipeline.version`) and,
on PostgreSQL, the node's model checksum. A remote worker with another version or other
models would deliver results that claim a model they did not come from, so it refuses
the job (see :mod:`radnode.pipeline.remote_worker`).

The checksum covers the ``models`` settings and every ``bundle.json`` of the
segmentation bundle (it pins the weights' SHA-256), so it is cheap -- no weights are
read, torch is not imported -- and changes whenever the models that would run change.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from radnode.config import Settings

#: Where the built-in demo bundle lives inside the package.
_DEMO_BUNDLES = Path(__file__).resolve().parents[1] / "models" / "bundles"


def bundle_checksum(settings: Settings) -> str:
    """SHA-256 over the model settings and the segmentation bundle's metadata."""
    digest = hashlib.sha256(settings.models.model_dump_json().encode("utf-8"))
    bundle = settings.models.segmentation_bundle
    folder = _DEMO_BUNDLES if bundle in (None, "demo") else None if bundle == "none" else Path(str(bundle))
    if folder is not None and folder.exists():
        metas = [folder] if folder.is_file() else sorted(folder.rglob("bundle.json"))
        for meta in metas:
            digest.update(meta.name.encode())
            digest.update(meta.read_bytes())
    return digest.hexdigest()
