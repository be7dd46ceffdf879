"""LIDC-IDRI reader outlines (``LidcReadMessage`` XML) as a consensus nodule mask.

The LIDC-IDRI collection has no RT Structure Sets: each of four radiologists outlined
every nodule ≥ 3 mm on the axial slices as a closed chain of boundary pixels
(``edgeMap``), per slice (``roi``, addressed by the slice's SOP Instance UID), with
``inclusion`` FALSE marking holes. The outlines lie *on* the boundary pixels, so a
reader's region is the polygon's interior plus the outline pixels themselves (the LIDC
convention; other conventions give somewhat smaller volumes).

Readers disagree a lot on small nodules, so a single reader is a poor reference. The
usual reference (e.g. pylidc's ``consensus``) is the voxels that at least half of the
readers who marked the nodule included; :func:`consensus_mask` builds it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from skimage.draw import polygon

#: XML namespace of LidcReadMessage documents.
NAMESPACE = {"lidc": "http://www.nih.gov"}


class LidcError(ValueError):
    """The XML cannot be read or marks nothing on the given series."""


def _reader_mask(nodules: Sequence[ET.Element], slice_of: dict[str, int], shape: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    holes = np.zeros(shape, dtype=bool)
    for nodule in nodules:
        for roi in nodule.findall("lidc:roi", NAMESPACE):
            index = slice_of.get((roi.findtext("lidc:imageSOP_UID", "", NAMESPACE) or "").strip())
            if index is None:
                continue
            cols = [int(e.findtext("lidc:xCoord", "0", NAMESPACE)) for e in roi.findall("lidc:edgeMap", NAMESPACE)]
            rows = [int(e.findtext("lidc:yCoord", "0", NAMESPACE)) for e in roi.findall("lidc:edgeMap", NAMESPACE)]
            if not cols:
                continue
            target = mask if (roi.findtext("lidc:inclusion", "TRUE", NAMESPACE) or "").strip().upper() == "TRUE" \
                else holes
            rr, cc = polygon(rows, cols, shape[1:])
            target[index, rr, cc] = True
            target[index, np.clip(rows, 0, shape[1] - 1), np.clip(cols, 0, shape[2] - 1)] = True
    return mask & ~holes


def consensus_mask(
    xml_files: Sequence[Path],
    sop_uids: Sequence[str],
    shape: tuple[int, int, int],
    min_fraction: float = 0.5,
) -> np.ndarray:
    """Voxels that at least ``min_fraction`` of the readers who marked something included.

    Parameters
    ----------
    xml_files
        LidcReadMessage documents (usually one per series, holding every reading session).
    sop_uids
        SOP Instance UID of each slice of the series, in array (z) order.
    shape
        The series' array shape (z, y, x).
    min_fraction
        Share of readers required (0.5: the 50 % consensus).

    Raises
    ------
    LidcError
        If no reader outlined anything on these slices.
    """
    slice_of = {uid: i for i, uid in enumerate(sop_uids)}
    readers = []
    for path in xml_files:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:
            raise LidcError(f"{path}: not readable XML ({exc})") from exc
        for session in root.findall("lidc:readingSession", NAMESPACE):
            mask = _reader_mask(session.findall("lidc:unblindedReadNodule", NAMESPACE), slice_of, shape)
            if mask.any():
                readers.append(mask)
    if not readers:
        raise LidcError(f"{[str(p) for p in xml_files]}: no reader outlined a nodule on these {shape[0]} slices")
    votes = np.sum(readers, axis=0)
    return votes >= max(1, int(np.ceil(min_fraction * len(readers))))
