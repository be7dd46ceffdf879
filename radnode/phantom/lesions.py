"""Lung tumours with a planted, controllable "mutation" signature.

Tumour types
------------
``solid``
    Soft-tissue density (mean 15..45 HU), smooth or mildly lobulated, inside the lung.
``part_solid``
    Ground-glass halo (-600..-480 HU) around a solid core (0..40 HU) of 45..60 % of
    the radius.
``ground_glass``
    Pure ground-glass opacity (-620..-480 HU).
``juxtapleural``
    Solid, centred on the costal pleura: the part that would lie in the chest wall is
    cut off, so it sits on the pleura with a broad, flat base.
``spiculated``
    Solid with 10..16 spicules: thin cone-shaped extensions of 0.5..1.3 radii.

Shape: an ellipsoid (equivalent diameter drawn from a range, axes within +-15 %, random
orientation) whose radius is modulated by direction ``d``::

    r(d) = 1 + A * sum_j c_j exp((d . v_j - 1) / 0.35)      (lobulation, 6 bumps)
             + sum_{j < n} s_j exp((d . w_j - 1) / k_j)       (spicules, k_j ~ 0.004..0.01)

Texture: mean + std * F, with F a unit-variance Gaussian random field of 1 mm
correlation length (solid std 12..20 HU, ground glass 25..40 HU).

The planted mutation
--------------------
A phantom carries one binary label (a patient-level status, like an EGFR mutation);
every tumour of a mutant phantom (label 1) is changed by the strength ``e`` =
``mutation_effect`` in [0, 1]:

* heterogeneity: the texture standard deviation becomes ``(1 + TEXTURE_GAIN * e)``
  times the wild-type one, through an added coarse component (3 mm correlation
  length), so the texture is both rougher and patchier;
* lobulation: the lobulation amplitude ``A`` grows by ``LOBULATION_GAIN * e``;
* spiculation: ``round(SPICULE_GAIN * e)`` more spicules (on every type).

Everything else (size, position, orientation, base texture, the random numbers behind
every field) is drawn independently of the label, so with ``e = 0`` a mutant phantom
is voxel-for-voxel identical to the wild-type phantom of the same seed, and with
``e > 0`` the only differences are the documented ones.

The tumour mask is exactly the set of voxels whose value the tumour set: the shape is
cut to the lung mask (and away from earlier tumours) *before* painting, and no blur is
applied afterwards, so truth and image agree voxel for voxel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
from scipy import ndimage

from radnode.phantom.anatomy import RIGHT_LUNG, Tissue
from radnode.phantom.geometry import VolumeGeometry

logger = logging.getLogger(__name__)

#: Texture std of a mutant tumour is (1 + TEXTURE_GAIN * e) times the wild-type one.
TEXTURE_GAIN = 1.0
#: Lobulation amplitude (fraction of the radius) added at full effect.
LOBULATION_GAIN = 0.2
#: Spicules added at full effect.
SPICULE_GAIN = 10
#: Spicules of a ``spiculated`` tumour before any mutation effect.
BASE_SPICULES = (10, 16)
#: Correlation lengths (Gaussian sigma, mm) of the fine and the coarse texture.
FINE_TEXTURE_MM = 1.0
COARSE_TEXTURE_MM = 3.0
#: Texture std (HU) of the solid core of a part-solid tumour (wild type).
PART_SOLID_CORE_STD_HU = 15.0
#: Number of lobulation bumps and size of the pool spicules are taken from.
LOBULATION_BUMPS = 6
SPICULE_POOL = BASE_SPICULES[1] + SPICULE_GAIN
#: A tumour must cover at least this many voxels, or it is placed again.
MIN_TUMOR_VOXELS = 8
#: Placement attempts per tumour before its size is reduced.
PLACEMENT_ATTEMPTS = 400
#: Tissues that make up the chest wall next to the costal pleura.
CHEST_WALL = (Tissue.MUSCLE, Tissue.BONE_CORTEX, Tissue.BONE_MARROW, Tissue.CARTILAGE, Tissue.FAT)


class TumorType(StrEnum):
    """Kinds of tumour (see the module docstring)."""

    SOLID = "solid"
    PART_SOLID = "part_solid"
    GROUND_GLASS = "ground_glass"
    JUXTAPLEURAL = "juxtapleural"
    SPICULATED = "spiculated"

    @property
    def density(self) -> str:
        """Radiological density class: solid, part_solid or ground_glass."""
        if self in (TumorType.PART_SOLID, TumorType.GROUND_GLASS):
            return self.value
        return "solid"


@dataclass(frozen=True)
class MutationEffect:
    """How strongly the planted mutation changes a tumour (``strength`` in [0, 1])."""

    strength: float

    @property
    def texture_factor(self) -> float:
        return 1.0 + TEXTURE_GAIN * self.strength

    @property
    def extra_lobulation(self) -> float:
        return LOBULATION_GAIN * self.strength

    @property
    def extra_spicules(self) -> int:
        return int(round(SPICULE_GAIN * self.strength))

    @staticmethod
    def describe() -> dict[str, object]:
        """The documented effect, for labels.json."""
        return {
            "texture": f"texture std multiplied by (1 + {TEXTURE_GAIN} * e) through an added coarse "
            f"({COARSE_TEXTURE_MM} mm) component: more heterogeneous",
            "lobulation": f"lobulation amplitude (fraction of radius) + {LOBULATION_GAIN} * e",
            "spiculation": f"round({SPICULE_GAIN} * e) additional spicules",
            "applies_to": "every tumour of a phantom whose mutation label is 1; e = mutation_effect",
            "invariant": "size, position, orientation and all random draws do not depend on the label; "
            "with e = 0 mutant and wild-type images are identical",
            "gains": {"texture": TEXTURE_GAIN, "lobulation": LOBULATION_GAIN, "spicules": SPICULE_GAIN},
        }


@dataclass(frozen=True)
class TumorDesign:
    """Everything random about one tumour, drawn before the mutation is applied."""

    kind: TumorType
    diameter_mm: float
    axes_ratio: np.ndarray  # (3,), product 1
    rotation: np.ndarray  # (3, 3) orthonormal
    lobulation: float
    lobe_dirs: np.ndarray  # (LOBULATION_BUMPS, 3)
    lobe_weights: np.ndarray  # (LOBULATION_BUMPS,), in [-1, 1]
    spicule_dirs: np.ndarray  # (SPICULE_POOL, 3)
    spicule_lengths: np.ndarray  # (SPICULE_POOL,), radii
    spicule_widths: np.ndarray  # (SPICULE_POOL,)
    base_spicules: int
    mean_hu: float
    std_hu: float
    core_fraction: float
    core_hu: float
    texture_seed: int

    @property
    def radius(self) -> float:
        return self.diameter_mm / 2.0

    def reach_mm(self) -> float:
        """Farthest any voxel of this tumour can lie from its centre, whatever the effect."""
        bulge = 1.0 + self.lobulation + LOBULATION_GAIN + float(self.spicule_lengths.max())
        return self.radius * float(self.axes_ratio.max()) * bulge

    def body_mm(self) -> float:
        """Radius of the tumour body without spicules (for placement)."""
        return self.radius * float(self.axes_ratio.max()) * (1.0 + self.lobulation + LOBULATION_GAIN)


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def draw_design(
    rng: np.random.Generator, kind: TumorType, diameter_range: tuple[float, float]
) -> TumorDesign:
    """Draw one tumour's shape and texture parameters (independent of the mutation)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    rotation = q * np.sign(np.diag(r))
    ratio = rng.uniform(0.85, 1.15, 3)
    ratio /= np.cbrt(ratio.prod())
    if kind is TumorType.GROUND_GLASS:
        mean, std = rng.uniform(-620.0, -480.0), rng.uniform(25.0, 40.0)
    elif kind is TumorType.PART_SOLID:
        mean, std = rng.uniform(-600.0, -480.0), rng.uniform(25.0, 40.0)
    else:
        mean, std = rng.uniform(15.0, 45.0), rng.uniform(12.0, 20.0)
    return TumorDesign(
        kind=kind,
        diameter_mm=float(rng.uniform(*diameter_range)),
        axes_ratio=ratio,
        rotation=rotation,
        lobulation=float(rng.uniform(0.03, 0.08)),
        lobe_dirs=_unit_vectors(rng, LOBULATION_BUMPS),
        lobe_weights=rng.uniform(-1.0, 1.0, LOBULATION_BUMPS),
        spicule_dirs=_unit_vectors(rng, SPICULE_POOL),
        spicule_lengths=rng.uniform(0.5, 1.3, SPICULE_POOL),
        spicule_widths=rng.uniform(0.004, 0.01, SPICULE_POOL),
        base_spicules=int(rng.integers(BASE_SPICULES[0], BASE_SPICULES[1] + 1))
        if kind is TumorType.SPICULATED
        else 0,
        mean_hu=float(mean),
        std_hu=float(std),
        core_fraction=float(rng.uniform(0.45, 0.6)),
        core_hu=float(rng.uniform(0.0, 40.0)),
        texture_seed=int(rng.integers(0, 2**63 - 1)),
    )


@dataclass(frozen=True)
class TumorInfo:
    """One planted tumour, as written to labels.json."""

    index: int
    kind: TumorType
    lung: str
    planned_centre_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    voxel_count: int
    volume_ml: float
    equivalent_diameter_mm: float
    design_diameter_mm: float
    lobulation: float
    spicules: int
    texture_std_hu: float
    mean_hu_planted: float
    mutation: int

    @property
    def margin(self) -> str:
        if self.spicules:
            return "spiculated"
        return "lobulated" if self.lobulation >= 0.1 else "smooth"

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "label_value": self.index,
            "type": self.kind.value,
            "density": self.kind.density,
            "margin": self.margin,
            "juxtapleural": self.kind is TumorType.JUXTAPLEURAL,
            "lung": self.lung,
            "centre_mm": [round(v, 3) for v in self.centre_mm],
            "planned_centre_mm": [round(v, 3) for v in self.planned_centre_mm],
            "voxel_count": self.voxel_count,
            "volume_ml": round(self.volume_ml, 6),
            "equivalent_diameter_mm": round(self.equivalent_diameter_mm, 3),
            "design_diameter_mm": round(self.design_diameter_mm, 3),
            "lobulation_amplitude": round(self.lobulation, 4),
            "spicules": self.spicules,
            "texture_std_hu": round(self.texture_std_hu, 3),
            "mean_hu_planted": round(self.mean_hu_planted, 3),
            "mutation": self.mutation,
        }


def _box(geometry: VolumeGeometry, centre: np.ndarray, reach: float) -> tuple[slice, slice, slice]:
    idx = geometry.mm_to_index(centre)
    half = reach / np.asarray(geometry.spacing_xyz[::-1])
    lo = np.maximum(np.floor(idx - half).astype(int), 0)
    hi = np.minimum(np.ceil(idx + half).astype(int) + 1, geometry.shape_zyx)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _local_coords(
    geometry: VolumeGeometry, box: tuple[slice, slice, slice], centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets (mm) from ``centre`` of the voxels of ``box``, as broadcastable x, y, z."""
    (zs, ys, xs) = box
    ox, oy, oz = geometry.origin_xyz
    sx, sy, sz = geometry.spacing_xyz
    x = (ox + sx * np.arange(xs.start, xs.stop) - centre[0]).reshape(1, 1, -1)
    y = (oy + sy * np.arange(ys.start, ys.stop) - centre[1]).reshape(1, -1, 1)
    z = (oz + sz * np.arange(zs.start, zs.stop) - centre[2]).reshape(-1, 1, 1)
    return x, y, z


def _shape(
    design: TumorDesign, effect: MutationEffect, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tumour and (for part-solid) core masks on the box with offsets x, y, z."""
    rot = design.rotation
    axes = design.radius * design.axes_ratio
    # Coordinates in the tumour's frame, scaled so the base ellipsoid is the unit sphere.
    q = [(rot[0, i] * x + rot[1, i] * y + rot[2, i] * z) / axes[i] for i in range(3)]
    rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    inv = 1.0 / np.maximum(rho, 1e-6)
    d = [c * inv for c in q]

    def along(v: np.ndarray) -> np.ndarray:
        return d[0] * v[0] + d[1] * v[1] + d[2] * v[2]

    weights = design.lobe_weights / np.abs(design.lobe_weights).max()
    lobes = sum(w * np.exp((along(v) - 1.0) / 0.35) for w, v in zip(weights, design.lobe_dirs, strict=True))
    radius = 1.0 + (design.lobulation + effect.extra_lobulation) * lobes
    n_spicules = min(design.base_spicules + effect.extra_spicules, SPICULE_POOL)
    for j in range(n_spicules):
        width = design.spicule_widths[j]
        radius = radius + design.spicule_lengths[j] * np.exp((along(design.spicule_dirs[j]) - 1.0) / width)
    body = rho <= radius
    core = np.zeros_like(body)
    if design.kind is TumorType.PART_SOLID:
        core = rho <= design.core_fraction * (1.0 + (design.lobulation + effect.extra_lobulation) * lobes)
    return body, core


def _unit_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_zyx: np.ndarray) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_zyx, mode="reflect")
    std = field.std()
    return field / std if std > 0 else field


def _texture(
    design: TumorDesign, effect: MutationEffect, geometry: VolumeGeometry, shape: tuple[int, ...], core: np.ndarray
) -> np.ndarray:
    """HU of the tumour over its box: fine texture, plus the mutant's coarse component."""
    rng = np.random.default_rng(design.texture_seed)
    spacing = np.asarray(geometry.spacing_xyz[::-1])
    fine = _unit_field(rng, shape, FINE_TEXTURE_MM / spacing)
    coarse = _unit_field(rng, shape, COARSE_TEXTURE_MM / spacing)
    # Independent unit fields: std of fine + c * coarse is sqrt(1 + c^2) = texture_factor.
    c = np.sqrt(effect.texture_factor**2 - 1.0)
    values = design.mean_hu + design.std_hu * (fine + c * coarse)
    if design.kind is TumorType.PART_SOLID:
        values = np.where(core, design.core_hu + PART_SOLID_CORE_STD_HU * (fine + c * coarse), values)
    return values


@dataclass
class _Placed:
    centre: np.ndarray
    reach: float


def _fits(
    design: TumorDesign,
    centre: np.ndarray,
    geometry: VolumeGeometry,
    lungs: np.ndarray,
    tissue: np.ndarray,
    placed: list[_Placed],
) -> bool:
    """Whether the tumour body fits at ``centre`` (inside the lung, or on the costal pleura)."""
    for other in placed:
        if np.linalg.norm(other.centre - centre) < other.reach + design.reach_mm() + 2.0:
            return False
    r = design.body_mm()
    box = _box(geometry, centre, r)
    x, y, z = _local_coords(geometry, box, centre)
    ball = x**2 + y**2 + z**2 <= r * r
    n_ball = int(ball.sum())
    if n_ball == 0:
        return False
    in_lung = lungs[box] > 0
    frac = float(np.count_nonzero(ball & in_lung)) / n_ball
    if design.kind is not TumorType.JUXTAPLEURAL:
        return frac >= 0.97
    if not 0.5 <= frac <= 0.8:
        return False
    outside = ball & ~in_lung
    wall = np.isin(tissue[box][outside], CHEST_WALL)
    return float(wall.mean()) >= 0.8


def place_and_paint(
    rng: np.random.Generator,
    designs: list[TumorDesign],
    effect: MutationEffect,
    mutation: int,
    hu: np.ndarray,
    lungs: np.ndarray,
    tissue: np.ndarray,
    geometry: VolumeGeometry,
) -> tuple[np.ndarray, list[TumorInfo]]:
    """Place every tumour in the lungs, paint its texture into ``hu`` and label it.

    Parameters
    ----------
    rng
        Random source for positions only.
    designs
        Tumour designs (:func:`draw_design`), in label order.
    effect
        The mutation effect to apply (strength 0 for wild-type phantoms).
    mutation
        The phantom's label (recorded per tumour).
    hu
        float32 image, changed in place.
    lungs, tissue
        Lung labels and tissue map on the same grid.
    geometry
        The grid.

    Returns
    -------
    tuple[numpy.ndarray, list[TumorInfo]]
        uint8 tumour labels (tumour ``i`` has value ``i``) and the tumours' records.

    Raises
    ------
    RuntimeError
        If a tumour cannot be placed even at a quarter of its size (the lung slab is too
        thin for it).
    """
    labels = np.zeros(geometry.shape_zyx, dtype=np.uint8)
    candidates = np.flatnonzero(lungs)
    if candidates.size == 0 and designs:
        raise RuntimeError(f"no lung voxels in the {geometry.shape_zyx} grid to place tumours in")
    placed: list[_Placed] = []
    infos: list[TumorInfo] = []
    z_mm = geometry.z_mm()
    for index, design in enumerate(designs, start=1):
        done = False
        for shrink in (1.0, 0.75, 0.5, 0.25):
            current = design if shrink == 1.0 else _shrunk(design, shrink)
            margin = current.body_mm() + geometry.spacing_xyz[2]
            for _ in range(PLACEMENT_ATTEMPTS):
                voxel = np.unravel_index(candidates[rng.integers(candidates.size)], geometry.shape_zyx)
                jitter = rng.uniform(-0.5, 0.5, 3) * np.asarray(geometry.spacing_xyz)
                centre = geometry.index_to_mm(np.array(voxel, dtype=float)) + jitter
                if not (z_mm[0] + margin <= centre[2] <= z_mm[-1] - margin):
                    continue
                if not _fits(current, centre, geometry, lungs, tissue, placed):
                    continue
                info = _paint(index, current, effect, mutation, centre, hu, lungs, labels, geometry)
                if info is None:
                    continue
                placed.append(_Placed(centre, current.reach_mm()))
                infos.append(info)
                done = True
                break
            if done:
                break
        if not done:
            raise RuntimeError(
                f"could not place tumour {index} ({design.kind.value}, {design.diameter_mm:.1f} mm) in the "
                f"lungs of a {geometry.shape_zyx} grid; use more slices or fewer/smaller tumours"
            )
    return labels, infos


def _shrunk(design: TumorDesign, factor: float) -> TumorDesign:
    return replace(design, diameter_mm=design.diameter_mm * factor)


def _paint(
    index: int,
    design: TumorDesign,
    effect: MutationEffect,
    mutation: int,
    centre: np.ndarray,
    hu: np.ndarray,
    lungs: np.ndarray,
    labels: np.ndarray,
    geometry: VolumeGeometry,
) -> TumorInfo | None:
    box = _box(geometry, centre, design.reach_mm())
    x, y, z = _local_coords(geometry, box, centre)
    body, core = _shape(design, effect, x, y, z)
    mask = body & (lungs[box] > 0) & (labels[box] == 0)
    count = int(mask.sum())
    if count < MIN_TUMOR_VOXELS:
        return None
    values = _texture(design, effect, geometry, mask.shape, core)
    hu[box][mask] = values[mask]
    labels[box][mask] = index
    zz, yy, xx = np.nonzero(mask)
    offset = np.array([b.start for b in box])
    centroid = geometry.index_to_mm(np.array([zz.mean(), yy.mean(), xx.mean()]) + offset)
    side = np.bincount(lungs[box][mask], minlength=3)[1:].argmax() + 1
    volume_ml = count * geometry.voxel_volume_mm3 / 1000.0
    return TumorInfo(
        index=index,
        kind=design.kind,
        lung="right" if side == RIGHT_LUNG else "left",
        planned_centre_mm=tuple(float(v) for v in centre),  # type: ignore[arg-type]
        centre_mm=tuple(float(v) for v in centroid),  # type: ignore[arg-type]
        voxel_count=count,
        volume_ml=volume_ml,
        equivalent_diameter_mm=float(np.cbrt(6.0 * volume_ml * 1000.0 / np.pi)),
        design_diameter_mm=design.diameter_mm,
        lobulation=design.lobulation + effect.extra_lobulation,
        spicules=min(design.base_spicules + effect.extra_spicules, SPICULE_POOL),
        texture_std_hu=design.std_hu * effect.texture_factor,
        mean_hu_planted=float(values[mask].mean()),
        mutation=mutation,
    )
