"""What the writers take: regions (masks on the CT grid), measurements and provenance.

The CT grid is the sorted source series (``load_series(path).datasets``): masks are
boolean numpy arrays ``(z, y, x)`` where ``z`` indexes those datasets, ``y`` the rows and
``x`` the columns of each slice. Everything here is plain data, validated when built, so
the writers can trust it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from pydicom.sr.coding import Code
from pydicom.dataset import Dataset

from radnode import __version__
from radnode.config.model import OutputSettings
from radnode.dicom_io import codes
from radnode.dicom_io.provenance import ContributingAlgorithm


class RegionKind(StrEnum):
    """The regions radnode produces."""

    LUNG = "lung"
    LUNG_LEFT = "lung_left"
    LUNG_RIGHT = "lung_right"
    TUMOUR = "tumour"
    PERITUMORAL_RING = "peritumoral_ring"


class RTROIInterpretedType(StrEnum):
    """RT ROI Interpreted Type (3006,00A4) values radnode uses (PS3.3 C.8.8.8.1)."""

    ORGAN = "ORGAN"
    GTV = "GTV"
    CONTROL = "CONTROL"


@dataclass(frozen=True)
class _KindDefaults:
    label: str
    category: Code
    property_type: Code
    modifier: Code | None
    rt_type: RTROIInterpretedType
    colour: tuple[int, int, int]


#: Per kind: label, CID 7150 category, CID 7151 type (+ CID 244 laterality modifier),
#: RT ROI type and display colour (RGB). Lungs blue-ish, tumour red, ring yellow.
KIND_DEFAULTS: Mapping[RegionKind, _KindDefaults] = {
    RegionKind.LUNG: _KindDefaults(
        "Lungs", codes.CATEGORY_ANATOMICAL_STRUCTURE, codes.LUNG, None,
        RTROIInterpretedType.ORGAN, (128, 174, 255)),
    RegionKind.LUNG_LEFT: _KindDefaults(
        "Lung left", codes.CATEGORY_ANATOMICAL_STRUCTURE, codes.LUNG, codes.LEFT,
        RTROIInterpretedType.ORGAN, (128, 174, 255)),
    RegionKind.LUNG_RIGHT: _KindDefaults(
        "Lung right", codes.CATEGORY_ANATOMICAL_STRUCTURE, codes.LUNG, codes.RIGHT,
        RTROIInterpretedType.ORGAN, (72, 120, 230)),
    RegionKind.TUMOUR: _KindDefaults(
        "Tumour", codes.CATEGORY_MORPHOLOGICALLY_ABNORMAL, codes.NEOPLASM, None,
        RTROIInterpretedType.GTV, (230, 40, 40)),
    RegionKind.PERITUMORAL_RING: _KindDefaults(
        "Peritumoral 3mm", codes.CATEGORY_SPATIAL_RELATIONAL, codes.PERITUMORAL_REGION, None,
        RTROIInterpretedType.CONTROL, (250, 210, 50)),
}


@dataclass(frozen=True, eq=False)
class Region:
    """One labelled region on the CT grid.

    Attributes
    ----------
    name
        Segment Label / ROI Name (at most 64 characters, PS3.5 LO).
    kind
        What the region is; decides the defaults below.
    mask
        Boolean ``(z, y, x)`` array on the source grid.
    colour
        Display colour RGB 0-255 (SEG converts it to CIELab, RTSTRUCT writes it as is).
    category, property_type, type_modifier
        Segmented Property Category (CID 7150) / Type (CID 7151) / Type Modifier
        (laterality, CID 244).
    rt_roi_type
        RT ROI Interpreted Type for the RTSTRUCT.
    review_note
        Set when a person must review the region before use (e.g. the tumour contour's
        quality score is below its threshold): the RTSTRUCT writes it as the ROI
        observation, and, for an empty region left out, says it instead of "not found".
    """

    name: str
    kind: RegionKind
    mask: np.ndarray
    colour: tuple[int, int, int] | None = None
    category: Code | None = None
    property_type: Code | None = None
    type_modifier: Code | None = None
    rt_roi_type: RTROIInterpretedType | None = None
    review_note: str | None = None

    def __post_init__(self) -> None:
        kind = RegionKind(self.kind)
        defaults = KIND_DEFAULTS[kind]
        mask = np.asarray(self.mask)
        if mask.ndim != 3:
            raise ValueError(
                f"region {self.name!r}: mask must be 3-D (z, y, x), got shape {mask.shape}"
            )
        if mask.dtype != np.bool_:
            if not np.issubdtype(mask.dtype, np.integer) or mask.min(initial=0) < 0 or mask.max(
                initial=0
            ) > 1:
                raise ValueError(
                    f"region {self.name!r}: mask must be boolean (or 0/1 integers), "
                    f"got dtype {mask.dtype}"
                )
            mask = mask.astype(bool)
        if not self.name or len(self.name) > 64 or "\\" in self.name:
            raise ValueError(
                f"region name {self.name!r} must be 1-64 characters without backslash (LO)"
            )
        colour = self.colour if self.colour is not None else defaults.colour
        if len(colour) != 3 or any(not 0 <= int(c) <= 255 for c in colour):
            raise ValueError(f"region {self.name!r}: colour {colour} must be 3 values 0-255")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "colour", tuple(int(c) for c in colour))
        if self.category is None:
            object.__setattr__(self, "category", defaults.category)
        if self.property_type is None:
            object.__setattr__(self, "property_type", defaults.property_type)
            if self.type_modifier is None:
                object.__setattr__(self, "type_modifier", defaults.modifier)
        object.__setattr__(
            self, "rt_roi_type", RTROIInterpretedType(self.rt_roi_type or defaults.rt_type)
        )

    @classmethod
    def of_kind(
        cls, kind: RegionKind | str, mask: np.ndarray, name: str | None = None, review_note: str | None = None
    ) -> Region:
        """A region with every attribute taken from the defaults of ``kind``."""
        kind = RegionKind(kind)
        return cls(name=name or KIND_DEFAULTS[kind].label, kind=kind, mask=mask, review_note=review_note)

    @property
    def is_empty(self) -> bool:
        """True when no voxel is set."""
        return not bool(self.mask.any())


@dataclass(frozen=True)
class Prediction:
    """One classifier output for the tumour (e.g. EGFR mutation present)."""

    endpoint: str
    probability: float
    classifier_name: str
    classifier_version: str
    training_cohort: str
    demo: bool = False
    #: SHA-256 of the classifier bundle (its Device UID in Contributing Equipment).
    checksum: str = ""
    #: Probability at or above which the positive class is reported (qualitative finding).
    threshold: float = 0.5
    #: Class names: below the threshold, at or above it.
    negative_class: str = "negative"
    positive_class: str = "positive"

    @property
    def predicted_class(self) -> str:
        """The model's class at its threshold."""
        return self.positive_class if self.is_positive else self.negative_class

    @property
    def is_positive(self) -> bool:
        """Whether the probability reaches the threshold."""
        return self.probability >= self.threshold

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"prediction {self.endpoint!r}: threshold {self.threshold} is not in (0, 1)")
        if not math.isfinite(self.probability) or not 0.0 <= self.probability <= 1.0:
            raise ValueError(
                f"prediction {self.endpoint!r}: probability {self.probability} is not in [0, 1]"
            )
        if not self.endpoint.strip():
            raise ValueError("prediction endpoint must not be empty")


@dataclass(frozen=True)
class RegionMeasurements:
    """Measurements of one region, reported in the SR (TID 1411 group).

    ``region_name`` must equal the :attr:`Region.name` written to the SEG, so the group
    can reference its segment. ``None`` leaves a value out.
    """

    region_name: str
    volume_ml: float | None = None
    mean_hu: float | None = None
    min_hu: float | None = None
    max_hu: float | None = None
    longest_diameter_mm: float | None = None
    sphericity: float | None = None
    features: Mapping[str, float] = field(default_factory=dict)
    contour_quality: ContourQualityFinding | None = None


@dataclass(frozen=True)
class ContourQualityFinding:
    """The reference-free quality assessment of a contour, as the SR reports it.

    ``uncertain`` means the score is below the model's calibrated threshold, or the
    network found a competing structure almost as probable, and a person must review the
    contour (see :mod:`radnode.models.quality`).
    """

    score: float
    threshold: float
    uncertain: bool
    text: str

    def __post_init__(self) -> None:
        if not math.isfinite(self.score) or not math.isfinite(self.threshold):
            raise ValueError(f"contour quality score {self.score} and threshold {self.threshold} must be finite")


@dataclass(frozen=True)
class ClinicianContourReport:
    """A clinician's GTV whose regions the SR's radiomics and predictions were computed on.

    ``regions`` are measured on the clinician's GTV (and its ring); ``rtstruct`` is the
    clinician's structure set (listed as SR evidence); the agreement values compare
    radnode's own tumour contour with the GTV (``None``: not computable).
    """

    roi_name: str
    rtstruct: Dataset
    regions: Sequence[tuple[RegionKind, RegionMeasurements]] = ()
    dice: float | None = None
    hd95_mm: float | None = None
    volume_ratio: float | None = None

    @property
    def text(self) -> str:
        return (
            f"measured on the clinician's contour: ROI '{self.roi_name}' of RT Structure Set "
            f"{self.rtstruct.SOPInstanceUID}"
        )


@dataclass(frozen=True)
class MeasurementSet:
    """Everything the SR reports (``clinician``: the contour the radiomics used, when not radnode's)."""

    regions: Sequence[RegionMeasurements] = ()
    predictions: Sequence[Prediction] = ()
    clinician: ClinicianContourReport | None = None


#: ``AlgorithmInfo.model_versions`` key suffix of a model's weights checksum ("<model> sha256").
CHECKSUM_SUFFIX = " sha256"


@dataclass(frozen=True)
class AlgorithmInfo:
    """Which algorithm produced the regions (Segment Algorithm Identification, TID 4019)."""

    name: str = "radnode"
    version: str = __version__
    family: Code = codes.ALGORITHM_FAMILY_AI
    model_versions: Mapping[str, str] = field(default_factory=dict)
    demo: bool = False
    #: Each algorithm behind the object (IHE AIR Contributing Equipment, Device UIDs).
    contributors: tuple[ContributingAlgorithm, ...] = ()

    @property
    def software_versions(self) -> tuple[str, ...]:
        """Software Versions (0018,1020): package first, then each model (LO: 64 characters).

        Weight checksums (keys ending in :data:`CHECKSUM_SUFFIX`) stay out: 64 hex digits
        next to a name do not fit an LO value; they are in the algorithm parameters.
        """
        models = sorted((k, v) for k, v in self.model_versions.items() if not k.endswith(CHECKSUM_SUFFIX))
        return (f"radnode {__version__}", *(f"{k} {v}"[:64] for k, v in models))

    def identity(self) -> tuple[str, ...]:
        """Strings that identify this algorithm for derived UIDs."""
        models = sorted(self.model_versions.items())
        # A changed bundle (new Device UID) gives new objects, even under the same version.
        devices = sorted(c.device_uid for c in self.contributors)
        return (self.name, self.version, *(f"{k}={v}" for k, v in models), *devices)


@dataclass(frozen=True)
class WriterOptions:
    """Identification of the written objects (from ``OutputSettings``) plus SR choices.

    Attributes
    ----------
    sr_features
        Radiomic feature names to report in the SR; ``None`` reports every feature
        given in the measurements.
    pipeline_version
        Part of the derived UIDs: a new version gives new objects.
    """

    uid_root: str = "2.25"
    seg_series_number: int = 9101
    rtstruct_series_number: int = 9102
    sr_series_number: int = 9103
    series_description_prefix: str = "radnode"
    sr_features: Sequence[str] | None = None
    pipeline_version: str = __version__
    manufacturer: str = "radnode"
    institution_name: str | None = None

    @classmethod
    def from_settings(cls, settings: OutputSettings, **overrides: Any) -> WriterOptions:
        """Options from the ``output`` section of the configuration."""
        values: dict[str, Any] = {
            "uid_root": settings.uid_root,
            "seg_series_number": settings.seg_series_number,
            "rtstruct_series_number": settings.rtstruct_series_number,
            "sr_series_number": settings.sr_series_number,
            "series_description_prefix": settings.series_description_prefix,
        }
        values.update(overrides)
        return cls(**values)

    def description(self, what: str) -> str:
        """Series Description (LO, 64 characters) for one object, e.g. ``radnode SEG``."""
        return f"{self.series_description_prefix} {what}".strip()[:64]


def as_writer_options(options: WriterOptions | OutputSettings | None) -> WriterOptions:
    """Accept either options type (or ``None`` for defaults)."""
    if options is None:
        return WriterOptions()
    if isinstance(options, WriterOptions):
        return options
    if isinstance(options, OutputSettings):
        return WriterOptions.from_settings(options)
    raise TypeError(
        f"options must be WriterOptions or radnode.config.model.OutputSettings, "
        f"not {type(options).__name__}"
    )
