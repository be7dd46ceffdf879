"""Synthetic chest CT phantoms with ground truth, for end-to-end tests of radnode.

:func:`generate_phantom` writes a CT Image Storage series and its truth (tumour and
lung label images on the CT grid, ``labels.json``); :func:`synthesize_volume` returns
the same volume in memory. A phantom is a pure function of its options: the same seed
gives byte-identical files and identical UIDs. Each phantom carries a planted binary
"mutation" label that changes its tumours' texture and shape in a documented,
controllable way (:mod:`radnode.phantom.lesions`).

This package knows no network and no queue; it depends on numpy, scipy, pydicom and
SimpleITK only.
"""

from radnode.phantom.generate import (
    PhantomResult,
    SyntheticVolume,
    generate_phantom,
    synthesize_volume,
)
from radnode.phantom.geometry import VolumeGeometry
from radnode.phantom.lesions import MutationEffect, TumorType
from radnode.phantom.parameters import PhantomParameters, parse_mutation

__all__ = [
    "MutationEffect",
    "PhantomParameters",
    "PhantomResult",
    "SyntheticVolume",
    "TumorType",
    "VolumeGeometry",
    "generate_phantom",
    "parse_mutation",
    "synthesize_volume",
]
