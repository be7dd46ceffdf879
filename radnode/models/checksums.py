"""SHA-256 of model files, read in chunks.

Weights, checkpoints and pickled models are hashed before they are trusted (bundle
checksums, settings pins, provenance in every object); some are hundreds of MB, so they are
never read into memory whole for it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Lower-case hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
