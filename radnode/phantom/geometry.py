"""The voxel grid of a phantom and its place in DICOM patient coordinates.

One object describes the grid for the image, the truth masks and the DICOM writer, so
the NIfTI truth and the CT series cannot disagree about where a voxel lies. Arrays are
indexed ``(z, y, x)`` (slice, row, column); coordinates and spacings are given in ITK
order ``(x, y, z)`` in millimetres of the DICOM patient coordinate system (LPS: +x to the
patient's left, +y posterior, +z head-wards; PS3.3 C.7.6.2.1.1).

The series is axial and unrotated: Image Orientation (Patient) is ``1\\0\\0\\0\\1\\0``
(rows run to the patient's left, columns run posterior) and slice ``k`` lies at
``origin_z + k * spacing_z``, so slice 0 is the most inferior. That is also the order in
which SimpleITK/GDCM sort a series by position, so a series read back with SimpleITK has
this very origin, spacing and (identity) direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Field of view (mm) that sets the default pixel spacing: FOV / matrix (PS3.3 C.8.2.1,
#: Reconstruction Diameter). 360 mm fits an adult chest, like a clinical chest protocol.
DEFAULT_FOV_MM = 360.0
#: Image Orientation (Patient) of an axial, unrotated slice (PS3.3 C.7.6.2.1.1).
AXIAL_ORIENTATION: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Row-major 3x3 direction cosines in ITK order (columns are the x, y, z axes).
IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: Decimals kept in positions so DICOM DS strings (<= 16 characters, PS3.5 6.2) hold
#: them exactly and the NIfTI truth reproduces them.
POSITION_DECIMALS = 6


@dataclass(frozen=True)
class VolumeGeometry:
    """An axial voxel grid in patient (LPS) coordinates.

    Parameters
    ----------
    shape_zyx
        Number of slices, rows and columns.
    spacing_xyz
        Column spacing, row spacing and slice spacing in mm (slice spacing equals the
        slice thickness: contiguous, non-overlapping slices).
    origin_xyz
        Patient position (mm) of the centre of voxel ``[0, 0, 0]``: the Image Position
        (Patient) of slice 0.
    """

    shape_zyx: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.shape_zyx) != 3 or min(self.shape_zyx) < 1:
            raise ValueError(f"shape_zyx must be three positive sizes, got {self.shape_zyx}")
        if len(self.spacing_xyz) != 3 or min(self.spacing_xyz) <= 0:
            raise ValueError(f"spacing_xyz must be three positive spacings (mm), got {self.spacing_xyz}")

    @classmethod
    def centred(
        cls, slices: int, matrix: int, pixel_spacing: float, slice_thickness: float, z_top: float
    ) -> VolumeGeometry:
        """A square grid centred on the scanner axis whose top slice lies at ``z_top``.

        ``x = y = 0`` is the centre of the reconstruction field (the isocentre), as on a
        scanner; slices run from ``z_top - (slices - 1) * slice_thickness`` up to
        ``z_top``.
        """
        half = (matrix - 1) / 2.0 * pixel_spacing
        z0 = z_top - (slices - 1) * slice_thickness
        origin = tuple(round(v, POSITION_DECIMALS) for v in (-half, -half, z0))
        return cls(
            shape_zyx=(int(slices), int(matrix), int(matrix)),
            spacing_xyz=(float(pixel_spacing), float(pixel_spacing), float(slice_thickness)),
            origin_xyz=origin,  # type: ignore[arg-type]
        )

    @property
    def direction(self) -> tuple[float, ...]:
        """Row-major direction cosines in ITK order (always identity here)."""
        return IDENTITY_DIRECTION

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3."""
        sx, sy, sz = self.spacing_xyz
        return sx * sy * sz

    def x_mm(self) -> np.ndarray:
        """Patient x (mm) of every column, float32."""
        return (self.origin_xyz[0] + self.spacing_xyz[0] * np.arange(self.shape_zyx[2])).astype(np.float32)

    def y_mm(self) -> np.ndarray:
        """Patient y (mm) of every row, float32."""
        return (self.origin_xyz[1] + self.spacing_xyz[1] * np.arange(self.shape_zyx[1])).astype(np.float32)

    def z_mm(self) -> np.ndarray:
        """Patient z (mm) of every slice, rounded like the DICOM Image Position (Patient)."""
        z = self.origin_xyz[2] + self.spacing_xyz[2] * np.arange(self.shape_zyx[0])
        return np.round(z, POSITION_DECIMALS)

    def slice_position(self, k: int) -> tuple[float, float, float]:
        """Image Position (Patient) of slice ``k`` (PS3.3 C.7.6.2.1.1)."""
        return (self.origin_xyz[0], self.origin_xyz[1], float(self.z_mm()[k]))

    def index_to_mm(self, zyx: np.ndarray) -> np.ndarray:
        """Map voxel indices ``(..., 3)`` in (z, y, x) order to patient mm in (x, y, z) order."""
        zyx = np.asarray(zyx, dtype=np.float64)
        xyz = zyx[..., ::-1]
        return np.asarray(self.origin_xyz) + xyz * np.asarray(self.spacing_xyz)

    def mm_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Map patient mm ``(..., 3)`` in (x, y, z) order to fractional (z, y, x) indices."""
        xyz = np.asarray(xyz, dtype=np.float64)
        ijk = (xyz - np.asarray(self.origin_xyz)) / np.asarray(self.spacing_xyz)
        return ijk[..., ::-1]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready description (for labels.json)."""
        return {
            "shape_zyx": list(self.shape_zyx),
            "spacing_xyz_mm": list(self.spacing_xyz),
            "origin_xyz_mm": list(self.origin_xyz),
            "direction": list(self.direction),
            "image_orientation_patient": list(AXIAL_ORIENTATION),
            "coordinate_system": "DICOM patient coordinates (LPS), mm",
        }
