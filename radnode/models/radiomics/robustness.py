"""Radiomic feature robustness: perturbed image + mask → radnode's extractor → ICC(3,1) per feature.

Each subject (a CT with a region mask) is perturbed ``k`` times
(:mod:`radnode.models.radiomics.perturb`: rotation, translation, contour growth/shrinkage
and noise-based contour randomisation, seeded); every version goes through the very
extractor the chain uses (:func:`radnode.models.radiomics.extract.extract_region` with a
shipped or custom profile), giving an ``n subjects × k perturbations × p features`` table,
and :func:`radnode.models.radiomics.icc.icc_3_1` turns each feature's ``n × k`` slice into
its ICC(3,1). Features at or above a threshold (0.75 by default, "good" reliability in Koo
& Li 2016) are the robust ones, the input of ``radnode features select --icc``.

Inputs are a CT (DICOM folder, or a NIfTI/NRRD/MHA file) and a mask (RTSTRUCT file and
ROI name, or a label image on the CT grid, any non-zero voxel in the region). The CT is
cropped to the region's bounding box plus a margin covering the largest move and
pyradiomics' padding, which keeps rotations cheap on a full CT; every version of a subject
is computed on the same crop, so the comparison is like for like.

A version whose region ends up empty or too small for the profile gives NaN for every
feature of that subject; such features get a NaN ICC and are not robust.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from radnode.models.radiomics.extract import Profile, extract_region, load_profile
from radnode.models.radiomics.icc import ICCResult, icc_3_1
from radnode.models.radiomics.perturb import (
    PerturbationSpec,
    perturb_case,
    perturbations,
)

logger = logging.getLogger(__name__)

#: Default ICC threshold of a robust feature (Koo & Li 2016: 0.75-0.9 is "good").
DEFAULT_ICC_THRESHOLD = 0.75
#: ICC needs at least this many subjects to mean anything.
MIN_SUBJECTS = 3
#: Extra margin (mm) kept around the region when cropping the CT (pyradiomics pads 10 voxels).
CROP_MARGIN_MM = 20.0
#: Columns of a cases CSV (``roi`` optional).
CASE_COLUMNS = ("case_id", "image", "mask")
#: Label-image suffixes read with SimpleITK.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


class RobustnessInputError(ValueError):
    """An input case, file or table that cannot be used (the message names it)."""


@dataclass(frozen=True)
class CaseSpec:
    """Where one subject's CT and mask are (paths as given or resolved from a cases CSV)."""

    case_id: str
    image: Path
    mask: Path
    roi: str | None = None


@dataclass(frozen=True)
class RobustnessCase:
    """One subject loaded: CT image and boolean region mask ``(z, y, x)`` on its grid."""

    case_id: str
    image: sitk.Image
    mask: np.ndarray


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES)


def read_cases_csv(path: str | os.PathLike[str]) -> list[CaseSpec]:
    """Cases of a CSV with columns ``case_id, image, mask[, roi]`` (relative paths from the CSV's folder).

    Raises
    ------
    RobustnessInputError
        Missing column, empty table or repeated case id (naming the file and line).
    """
    p = Path(path)
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        missing = [c for c in CASE_COLUMNS if c not in fields]
        if missing:
            raise RobustnessInputError(f"{p}: cases table needs columns {list(CASE_COLUMNS)} (+ optional 'roi'); "
                                       f"missing {missing}, has {fields}")
        out: list[CaseSpec] = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not any(row.values()):
                continue
            if not all(row.get(c) for c in CASE_COLUMNS):
                raise RobustnessInputError(f"{p} line {line}: case_id, image and mask must all be given")
            image, mask = Path(row["image"]), Path(row["mask"])
            out.append(CaseSpec(row["case_id"], image if image.is_absolute() else p.parent / image,
                                mask if mask.is_absolute() else p.parent / mask, row.get("roi") or None))
    if not out:
        raise RobustnessInputError(f"{p}: no cases")
    ids = [c.case_id for c in out]
    if len(set(ids)) != len(ids):
        raise RobustnessInputError(f"{p}: repeated case_id values")
    return out


def load_case(spec: CaseSpec) -> RobustnessCase:
    """Read a subject's CT and mask (DICOM folder + RTSTRUCT/ROI, or image files).

    Raises
    ------
    RobustnessInputError
        Unreadable input, an RTSTRUCT without ``roi``, a mask off the CT grid, or an empty mask.
    """
    if spec.image.is_dir():
        from radnode.dicom_io.series import load_series

        try:
            series: Any = load_series(spec.image, strict=False)
        except Exception as exc:  # the reader's message says what is wrong
            raise RobustnessInputError(f"case {spec.case_id}: cannot read the CT series in {spec.image}: {exc}") from exc
        image = series.image
    elif _is_image_file(spec.image):
        series = None
        image = sitk.ReadImage(str(spec.image))
    else:
        raise RobustnessInputError(f"case {spec.case_id}: image {spec.image} is neither a DICOM folder nor a "
                                   f"file ending in {', '.join(IMAGE_SUFFIXES)}")
    if image.GetDimension() != 3:
        raise RobustnessInputError(f"case {spec.case_id}: image {spec.image} is not 3-D")
    if _is_image_file(spec.mask):
        label = sitk.ReadImage(str(spec.mask))
        if label.GetSize() != image.GetSize():
            raise RobustnessInputError(f"case {spec.case_id}: mask {spec.mask} has size {label.GetSize()}, the CT "
                                       f"{image.GetSize()}; the mask must be on the CT grid")
        mask = sitk.GetArrayFromImage(label) != 0
    elif spec.mask.is_file():
        if series is None:
            raise RobustnessInputError(f"case {spec.case_id}: an RTSTRUCT mask ({spec.mask}) needs the CT as a "
                                       "DICOM folder")
        if not spec.roi:
            raise RobustnessInputError(f"case {spec.case_id}: mask {spec.mask} is an RTSTRUCT; name the ROI (roi)")
        from radnode.dicom_io.rtstruct_read import RTStructError, rasterise_roi

        try:
            mask = rasterise_roi(spec.mask, series, spec.roi)
        except (RTStructError, OSError, ValueError) as exc:
            raise RobustnessInputError(f"case {spec.case_id}: {exc}") from exc
    else:
        raise RobustnessInputError(f"case {spec.case_id}: mask {spec.mask} does not exist")
    if not np.any(mask):
        raise RobustnessInputError(f"case {spec.case_id}: the mask ({spec.mask}{', ROI ' + spec.roi if spec.roi else ''}) "
                                   "is empty")
    return RobustnessCase(spec.case_id, image, np.asarray(mask, dtype=bool))


def crop_to_region(case: RobustnessCase, margin_mm: float) -> RobustnessCase:
    """The case cropped to its mask's bounding box plus ``margin_mm`` on every side."""
    box = ndi.find_objects(case.mask.astype(np.uint8))[0]
    spacing_zyx = tuple(reversed(case.image.GetSpacing()))
    lo = [max(0, b.start - math.ceil(margin_mm / s)) for b, s in zip(box, spacing_zyx)]
    hi = [min(n, b.stop + math.ceil(margin_mm / s)) for b, s, n in zip(box, spacing_zyx, case.mask.shape)]
    index_xyz = [int(v) for v in reversed(lo)]
    size_xyz = [int(h - lo_) for h, lo_ in zip(reversed(hi), reversed(lo))]
    image = sitk.RegionOfInterest(case.image, size_xyz, index_xyz)
    mask = case.mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return RobustnessCase(case.case_id, image, mask)


@dataclass
class RobustnessResult:
    """Features of every perturbed version of every subject, and each feature's ICC(3,1).

    Attributes
    ----------
    case_ids
        Subjects in order.
    names
        Feature names (with the region prefix when one was given).
    values
        ``(n, k, p)`` feature values (NaN where a version could not be measured).
    icc
        :class:`ICCResult` over subjects × perturbations.
    perturbations
        The global parameters of each perturbation.
    profile
        The extraction profile's label.
    notes
        Remarks (versions that could not be measured, ...).
    """

    case_ids: list[str]
    names: list[str]
    values: np.ndarray
    icc: ICCResult
    perturbations: list[dict[str, object]]
    profile: str
    notes: list[str] = field(default_factory=list)

    def robust(self, threshold: float = DEFAULT_ICC_THRESHOLD) -> list[str]:
        """Features whose ICC(3,1) is at least ``threshold``, best first."""
        order = np.argsort(-np.nan_to_num(self.icc.icc, nan=-np.inf), kind="stable")
        return [self.names[i] for i in order if np.isfinite(self.icc.icc[i]) and self.icc.icc[i] >= threshold]

    def write_icc_csv(self, path: str | os.PathLike[str], threshold: float = DEFAULT_ICC_THRESHOLD) -> Path:
        """``feature, icc, ci_low, ci_high, ms_subjects, ms_error, n_subjects, n_perturbations, robust``."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        r = self.icc
        with p.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["feature", "icc", "ci_low", "ci_high", "ms_subjects", "ms_error", "n_subjects",
                             "n_perturbations", "robust"])
            for i, name in enumerate(self.names):
                cells = [_cell(r.icc[i]), _cell(r.ci_low[i]), _cell(r.ci_high[i]), _cell(r.ms_subjects[i]),
                         _cell(r.ms_error[i])]
                ok = bool(np.isfinite(r.icc[i]) and r.icc[i] >= threshold)
                writer.writerow([name, *cells, r.n_subjects, r.n_raters, "yes" if ok else "no"])
        return p

    def write_features_csv(self, path: str | os.PathLike[str]) -> Path:
        """Long table: one row per subject and perturbation (``case_id`` = ``<case>#p<j>``)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case_id", *self.names])
            for i, cid in enumerate(self.case_ids):
                for j in range(self.values.shape[1]):
                    writer.writerow([f"{cid}#p{j}", *(_cell(v) for v in self.values[i, j])])
        return p

    def summary(self, threshold: float = DEFAULT_ICC_THRESHOLD) -> dict[str, Any]:
        icc = self.icc.icc
        finite = icc[np.isfinite(icc)]
        return {
            "subjects": len(self.case_ids),
            "perturbations_per_subject": int(self.values.shape[1]),
            "features": len(self.names),
            "threshold": threshold,
            "robust": len(self.robust(threshold)),
            "undefined_icc": int(np.count_nonzero(~np.isfinite(icc))),
            "icc_median": float(np.median(finite)) if finite.size else None,
            "profile": self.profile,
            "perturbations": self.perturbations,
            "notes": list(self.notes),
        }


def _cell(value: float) -> str:
    return repr(float(value)) if math.isfinite(float(value)) else ""


def read_icc_csv(path: str | os.PathLike[str]) -> dict[str, float]:
    """``feature → ICC`` of a robustness CSV (NaN where the ICC was undefined).

    Raises
    ------
    RobustnessInputError
        Without ``feature`` and ``icc`` columns, or when a cell is not a number.
    """
    p = Path(path)
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "feature" not in fields or "icc" not in fields:
            raise RobustnessInputError(f"{p}: an ICC table needs 'feature' and 'icc' columns, has {fields}")
        out: dict[str, float] = {}
        for line, row in enumerate(reader, start=2):
            text = (row.get("icc") or "").strip()
            try:
                out[(row.get("feature") or "").strip()] = float(text) if text else math.nan
            except ValueError:
                raise RobustnessInputError(f"{p} line {line}: icc {text[:20]!r} is not a number") from None
    return out


def assess_robustness(
    cases: Sequence[RobustnessCase],
    profile: str | Path | Profile = "tumour-v1",
    spec: PerturbationSpec | None = None,
    *,
    region: str = "",
    crop_margin_mm: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> RobustnessResult:
    """Perturb every subject, extract its features per version, and compute ICC(3,1) per feature.

    Parameters
    ----------
    cases
        At least :data:`MIN_SUBJECTS` subjects.
    profile
        Extraction profile (shipped name, YAML path or :class:`Profile`), as in the chain.
    spec
        Perturbations (default :class:`PerturbationSpec`).
    region
        Prefix for the feature names (``tumour`` gives ``tumour_original_firstorder_Mean``,
        the column names of the chain's classifiers); empty for none.
    crop_margin_mm
        Margin kept around the region; default covers the largest move plus 20 mm.
    progress
        Called with ``(case_id, version, versions)`` after each extraction.

    Raises
    ------
    RobustnessInputError
        Fewer than :data:`MIN_SUBJECTS` subjects, repeated ids, or no feature at all.
    """
    spec = spec or PerturbationSpec()
    if len(cases) < MIN_SUBJECTS:
        raise RobustnessInputError(f"ICC(3,1) is computed over subjects x perturbations and needs at least "
                                   f"{MIN_SUBJECTS} subjects; got {len(cases)}")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise RobustnessInputError("repeated case ids among the robustness subjects")
    prof = load_profile(profile)
    plan = perturbations(spec)
    margin = crop_margin_mm if crop_margin_mm is not None else (
        CROP_MARGIN_MM + spec.translation_mm + spec.dilation_mm + 4 * spec.randomise_mm)
    rows: list[list[dict[str, float] | None]] = []
    notes: list[str] = []
    for subject, case in enumerate(cases):
        cropped = crop_to_region(case, margin)
        versions: list[dict[str, float] | None] = []
        for perturbation in plan:
            image, mask = perturb_case(cropped.image, cropped.mask, perturbation, spec, subject)
            found = extract_region(image, mask, prof, region=region or "region")
            if found.status == "done":
                versions.append(found.features)
            else:
                versions.append(None)
                notes.append(f"{case.case_id} perturbation {perturbation.index}: {found.status} "
                             f"({'; '.join(found.notes)[:200]})")
            if progress is not None:
                progress(case.case_id, perturbation.index, len(plan))
        rows.append(versions)
    names = next((list(v) for r in rows for v in r if v is not None), None)
    if not names:
        raise RobustnessInputError(f"no version of any subject could be measured with profile {prof.label}")
    values = np.full((len(cases), len(plan), len(names)), np.nan)
    for i, versions in enumerate(rows):
        for j, found in enumerate(versions):
            if found is not None:
                values[i, j] = [found.get(n, math.nan) for n in names]
    prefixed = [f"{region}_{n}" if region else n for n in names]
    result = RobustnessResult(ids, prefixed, values, icc_3_1(values), [p.as_dict() for p in plan], prof.label, notes)
    logger.info("robustness: %d subjects x %d versions, %d features, %d with ICC >= %.2f", len(cases), len(plan),
                len(names), len(result.robust()), DEFAULT_ICC_THRESHOLD)
    return result


def write_outputs(result: RobustnessResult, out_dir: str | os.PathLike[str],
                  threshold: float = DEFAULT_ICC_THRESHOLD) -> dict[str, Path]:
    """``icc.csv``, ``robust_features.txt``, ``perturbed_features.csv`` and ``summary.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "icc": result.write_icc_csv(out / "icc.csv", threshold),
        "features": result.write_features_csv(out / "perturbed_features.csv"),
        "robust": out / "robust_features.txt",
        "summary": out / "summary.json",
    }
    paths["robust"].write_text("".join(f"{n}\n" for n in result.robust(threshold)), encoding="utf-8")
    paths["summary"].write_text(json.dumps(result.summary(threshold), indent=2) + "\n", encoding="utf-8")
    return paths
