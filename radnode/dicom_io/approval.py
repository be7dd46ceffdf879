"""The approved copy of an RTSTRUCT: what a reviewer let go to a planning system.

radnode's RTSTRUCT says Approval Status UNAPPROVED (an automatic result). When a reviewer
approves it in the dashboard, the planning system gets a **new instance** (a new SOP
Instance UID in the same series, so archives keep both and nothing is overwritten) whose
Approval module (PS3.3 C.8.8.16) says APPROVED with Review Date, Review Time and Reviewer
Name. Structures the reviewer rejected are left out consistently: their Structure Set ROI
item, ROI Contour item and every RT ROI Observation that refers to them (PS3.3 C.8.8.5,
C.8.8.6, C.8.8.8), also as a related ROI. The reviewer's comment and the left-out names
go into Structure Set Description; each kept ROI's ROI Interpreter is the reviewer, and a
kept structure flagged "REVIEW REQUIRED" (an uncertain tumour) is labelled "REVIEWED".

The new SOP Instance UID is derived from the original's, the reviewer and the kept
structures: writing the same approval again (a retry after a crash) gives the same
instance, so a destination holds it once.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from radnode.dicom_io.uids import derive_uid

#: Approval Status (PS3.3 C.8.8.16.1) of a reviewed and accepted structure set.
APPROVED = "APPROVED"
#: ROI Observation Label (SH) of a flagged structure a reviewer approved.
REVIEWED_LABEL = "REVIEWED"
#: PS3.5 Table 6.2-1: ST holds at most 1024 characters.
ST_MAX_LENGTH = 1024


class ApprovalError(ValueError):
    """An approval the RTSTRUCT cannot carry (an unknown structure, nothing left to send)."""


def roi_names(ds: Dataset) -> list[str]:
    """The ROI names of an RTSTRUCT, in its order."""
    return [str(item.ROIName) for item in ds.get("StructureSetROISequence", [])]


def _charset_allows_unicode(ds: Dataset) -> bool:
    charsets = ds.get("SpecificCharacterSet") or []
    charsets = [charsets] if isinstance(charsets, str) else list(charsets)
    return "ISO_IR 192" in charsets


def _keep(items: Iterable[Dataset], numbers: set[int], attribute: str) -> DicomSequence:
    return DicomSequence([item for item in items if int(item.get(attribute, -1)) in numbers])


def approved_rtstruct(
    original: Dataset,
    reviewer: str,
    reviewed_at: datetime.datetime,
    rejected: Iterable[str] = (),
    comment: str = "",
    uid_root: str = "2.25",
) -> Dataset:
    """A new RTSTRUCT instance: ``original`` approved by ``reviewer``, without the ``rejected`` ROIs.

    Raises :class:`ApprovalError` for a rejected name the RTSTRUCT does not have, or when
    every structure is rejected (that is a rejection, not an approval).
    """
    from radnode.dicom_io.rtstruct_writer import REVIEW_LABEL  # here: that module loads highdicom (a second)

    names = roi_names(original)
    left_out = list(dict.fromkeys(rejected))
    unknown = [n for n in left_out if n not in names]
    if unknown:
        raise ApprovalError(f"no structure called {', '.join(map(repr, unknown))}; the RTSTRUCT has {names}")
    kept_items = [item for item in original.StructureSetROISequence if str(item.ROIName) not in left_out]
    if not kept_items:
        raise ApprovalError("every structure was rejected: reject the contours instead of approving none")
    kept = {int(item.ROINumber) for item in kept_items}
    kept_names = [str(item.ROIName) for item in kept_items]

    ds = copy.deepcopy(original)
    ds.StructureSetROISequence = _keep(ds.StructureSetROISequence, kept, "ROINumber")
    ds.ROIContourSequence = _keep(ds.get("ROIContourSequence", []), kept, "ReferencedROINumber")
    observations = _keep(ds.get("RTROIObservationsSequence", []), kept, "ReferencedROINumber")
    for obs in observations:
        related = obs.get("RTRelatedROISequence")
        if related is not None:
            remaining = _keep(related, kept, "ReferencedROINumber")
            if remaining:
                obs.RTRelatedROISequence = remaining
            else:
                del obs.RTRelatedROISequence
        obs.ROIInterpreter = reviewer
        if obs.get("ROIObservationLabel") == REVIEW_LABEL:  # the doubt was looked at: say so
            obs.ROIObservationLabel = REVIEWED_LABEL
            was = obs.get("ROIObservationDescription", "")
            obs.ROIObservationDescription = f"approved at review by {reviewer}; was: {was}"[:ST_MAX_LENGTH]
    ds.RTROIObservationsSequence = observations

    sop_uid = derive_uid(uid_root, "approved-rtstruct", str(original.SOPInstanceUID), reviewer, *sorted(kept_names))
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.InstanceNumber = int(original.get("InstanceNumber", 1) or 1) + 1
    ds.InstanceCreationDate = reviewed_at.strftime("%Y%m%d")
    ds.InstanceCreationTime = reviewed_at.strftime("%H%M%S")
    # Approval (C.8.8.16): Review Date/Time/Reviewer Name are required once APPROVED.
    ds.ApprovalStatus = APPROVED
    ds.ReviewDate = ds.InstanceCreationDate
    ds.ReviewTime = ds.InstanceCreationTime
    ds.ReviewerName = reviewer
    parts = [f"approved by {reviewer}"]
    if left_out:
        parts.append("rejected at review, left out: " + ", ".join(left_out))
    if comment.strip():
        parts.append("comment: " + " ".join(comment.split()))
    previous = str(original.get("StructureSetDescription", "") or "")
    description = "; ".join(parts) + (f" | {previous}" if previous else "")
    if not _charset_allows_unicode(ds):  # the source CT's character set; the default is ASCII only
        description = description.encode("ascii", "replace").decode("ascii")
    ds.StructureSetDescription = description[:ST_MAX_LENGTH]
    return ds
