"""The options of a phantom, validated once, and the random streams they seed.

Every random choice of a phantom comes from one of a few independent streams, each
seeded by ``(seed, stream)``. Changing one option (the number of tumours, the mutation
label, the noise) therefore leaves the draws of the other streams alone: the chest is
the same for every grid and label, and the noise does not move the tumours.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from enum import IntEnum

import numpy as np

from radnode.phantom.geometry import DEFAULT_FOV_MM
from radnode.phantom.lesions import TumorType

#: Largest seed (the study date and accession number are derived from it).
MAX_SEED = 2**32 - 1
#: Most tumours one phantom may hold (uint8 truth labels; placement gets crowded).
MAX_TUMORS = 20
#: Allowed grid sizes.
MATRIX_RANGE = (32, 1024)
SLICES_RANGE = (4, 1000)
SLICE_THICKNESS_RANGE_MM = (0.5, 10.0)
PIXEL_SPACING_RANGE_MM = (0.2, 8.0)
TUMOR_DIAMETER_RANGE_MM = (4.0, 60.0)
#: ``mutation="random"`` means this probability of a mutant phantom.
RANDOM_MUTATION_PROBABILITY = 0.5


class Stream(IntEnum):
    """Independent random streams of one phantom."""

    ANATOMY = 1
    TUMOR_DESIGN = 2
    PLACEMENT = 3
    MUTATION = 4
    NOISE = 5
    PATIENT = 6


def parse_mutation(value: float | int | str) -> float:
    """Probability that the phantom is a mutant, from ``0``, ``1``, ``"random"`` or a probability.

    Raises
    ------
    ValueError
        If ``value`` is none of those (the message names the allowed forms).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "random":
            return RANDOM_MUTATION_PROBABILITY
        try:
            number = float(text)
        except ValueError:
            raise ValueError(
                f"mutation must be 0, 1, 'random' or a probability in [0, 1]; got {value!r}"
            ) from None
    elif isinstance(value, (bool, int, float)):
        number = float(value)
    else:
        raise ValueError(f"mutation must be 0, 1, 'random' or a probability in [0, 1]; got {value!r}")
    if not 0.0 <= number <= 1.0 or number != number:
        raise ValueError(f"mutation probability must lie in [0, 1]; got {value!r}")
    return number


def _check_range(name: str, value: float, bounds: tuple[float, float]) -> None:
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name} must lie in [{bounds[0]}, {bounds[1]}]; got {value}")


@dataclass(frozen=True)
class PhantomParameters:
    """Validated options of one phantom (see :func:`radnode.phantom.synthesize_volume`).

    Raises
    ------
    ValueError
        On construction, for any option out of range; the message names the option and
        what is allowed.
    """

    seed: int
    slices: int = 100
    tumors: int = 1
    matrix: int = 512
    pixel_spacing: float | None = None
    slice_thickness: float = 2.5
    mutation: float | int | str = "random"
    mutation_effect: float = 1.0
    tumor_types: tuple[TumorType, ...] | None = None
    tumor_diameter_mm: tuple[float, float] = (10.0, 35.0)
    noise_hu: float | None = None
    patient_id: str | None = None
    patient_name: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")
        _check_range("seed", int(self.seed), (0, MAX_SEED))
        set_(self, "seed", int(self.seed))
        _check_range("slices", int(self.slices), SLICES_RANGE)
        _check_range("tumors", int(self.tumors), (0, MAX_TUMORS))
        _check_range("matrix", int(self.matrix), MATRIX_RANGE)
        set_(self, "slices", int(self.slices))
        set_(self, "tumors", int(self.tumors))
        set_(self, "matrix", int(self.matrix))
        if self.pixel_spacing is not None:
            _check_range("pixel_spacing", float(self.pixel_spacing), PIXEL_SPACING_RANGE_MM)
            set_(self, "pixel_spacing", float(self.pixel_spacing))
        _check_range("slice_thickness", float(self.slice_thickness), SLICE_THICKNESS_RANGE_MM)
        set_(self, "slice_thickness", float(self.slice_thickness))
        set_(self, "mutation", parse_mutation(self.mutation))
        _check_range("mutation_effect", float(self.mutation_effect), (0.0, 1.0))
        set_(self, "mutation_effect", float(self.mutation_effect))
        if self.tumor_types is not None:
            allowed = ", ".join(t.value for t in TumorType)
            try:
                kinds = tuple(TumorType(t) for t in self.tumor_types)
            except ValueError:
                raise ValueError(f"tumor_types must be among {allowed}; got {list(self.tumor_types)}") from None
            if len(kinds) not in (1, self.tumors) and self.tumors:
                raise ValueError(
                    f"tumor_types must name one type for all tumours or one per tumour ({self.tumors}); "
                    f"got {len(kinds)}"
                )
            set_(self, "tumor_types", kinds)
        lo, hi = (float(v) for v in self.tumor_diameter_mm)
        _check_range("tumor_diameter_mm minimum", lo, TUMOR_DIAMETER_RANGE_MM)
        _check_range("tumor_diameter_mm maximum", hi, (lo, TUMOR_DIAMETER_RANGE_MM[1]))
        set_(self, "tumor_diameter_mm", (lo, hi))
        if self.noise_hu is not None:
            _check_range("noise_hu", float(self.noise_hu), (0.0, 500.0))
            set_(self, "noise_hu", float(self.noise_hu))
        for name in ("patient_id", "patient_name"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or len(value) > 64 or "\\" in value):
                raise ValueError(f"{name} must be 1..64 characters without a backslash; got {value!r}")

    @property
    def mutation_probability(self) -> float:
        """Probability that the phantom is a mutant (``mutation`` after parsing)."""
        return float(self.mutation)

    @property
    def resolved_pixel_spacing(self) -> float:
        """Pixel spacing (mm): as given, or a 360 mm field of view over the matrix."""
        if self.pixel_spacing is not None:
            return self.pixel_spacing
        return round(DEFAULT_FOV_MM / self.matrix, 6)

    @property
    def resolved_patient_id(self) -> str:
        return self.patient_id or f"PHANTOM-{self.seed}"

    @property
    def resolved_patient_name(self) -> str:
        return self.patient_name or f"PHANTOM^{self.seed}"

    def draw_mutation(self) -> int:
        """The planted label: 1 with probability :attr:`mutation_probability` (own stream)."""
        return int(self.rng(Stream.MUTATION).random() < self.mutation_probability)

    def tumor_kinds(self, rng: np.random.Generator) -> list[TumorType]:
        """The type of each tumour: as given (one for all, or one each) or drawn uniformly."""
        if self.tumor_types is None:
            choices = list(TumorType)
            return [choices[int(rng.integers(len(choices)))] for _ in range(self.tumors)]
        if len(self.tumor_types) == 1:
            return [self.tumor_types[0]] * self.tumors
        return list(self.tumor_types)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready options (types as strings)."""
        out = asdict(self)
        out["tumor_types"] = None if self.tumor_types is None else [t.value for t in self.tumor_types]
        out["tumor_diameter_mm"] = list(self.tumor_diameter_mm)
        out["pixel_spacing_resolved"] = self.resolved_pixel_spacing
        out["patient_id"] = self.resolved_patient_id
        out["patient_name"] = self.resolved_patient_name
        return out

    def key(self) -> str:
        """A digest of every option: part of the series UIDs, so other options, other UIDs."""
        text = json.dumps(self.as_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def rng(self, stream: Stream, *extra: int) -> np.random.Generator:
        """The generator of one stream (``extra`` separates e.g. tumours within it)."""
        return np.random.default_rng([self.seed, int(stream), *extra])
