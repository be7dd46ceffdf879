"""A plausible adult chest, drawn slice by slice from a few random shape parameters.

The body is a stack of nested rounded (super-elliptic) cross-sections whose sizes vary
smoothly along the body axis: skin, subcutaneous fat, chest-wall muscle, the rib ring
and the thoracic cavity. Inside the cavity the lungs are what is left after removing the
mediastinum (a midline band, the heart, the great vessels, trachea and oesophagus), the
vertebral body, the space above each lung apex and below each hemidiaphragm dome. Below
the domes lie liver, stomach (with its gas bubble) and spleen. Bones have a cortical
shell and a marrow core; ribs slope downwards from back to front and repeat along the
body axis, vertebrae alternate with discs.

The craniocaudal position is written as ``u``: 0 at the lung apices, 1 at the deepest
costophrenic recess, so shapes scale with the (random) lung height. Intensities are
those of an unenhanced chest CT (PS3.3 C.8.2.1: CT numbers in HU, water 0, air -1000):
lung parenchyma about -875 HU (about -830 with its vessels) with a gravity-dependent
gradient (denser posteriorly, as in a supine patient), fat -95, muscle 50, blood 42,
cortical bone about 850.

Everything is evaluated with numpy broadcasting on 1-D row/column coordinates, so a slice
costs a few dozen whole-array operations and no per-voxel Python.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from radnode.phantom.geometry import VolumeGeometry
from radnode.phantom.tubes import Segments, TreeStyle, blend_segments, rasterize_segments, territory_tree

logger = logging.getLogger(__name__)


class Tissue(IntEnum):
    """Tissue classes of the anatomy map (before vessels, airways and tumours)."""

    AIR = 0
    TABLE_SHELL = 1
    TABLE_FOAM = 2
    SKIN = 3
    FAT = 4
    MUSCLE = 5
    BONE_CORTEX = 6
    BONE_MARROW = 7
    CARTILAGE = 8
    DISC = 9
    CSF = 10
    MEDIASTINAL_FAT = 11
    HEART = 12
    LIVER = 13
    SPLEEN = 14
    STOMACH = 15
    GAS = 16
    LUNG = 17


#: Mean CT number (HU) of each tissue in an unenhanced scan.
TISSUE_HU: dict[Tissue, float] = {
    Tissue.AIR: -1000.0,
    Tissue.TABLE_SHELL: 180.0,
    Tissue.TABLE_FOAM: -850.0,
    Tissue.SKIN: 25.0,
    Tissue.FAT: -95.0,
    Tissue.MUSCLE: 50.0,
    Tissue.BONE_CORTEX: 850.0,
    Tissue.BONE_MARROW: 230.0,
    Tissue.CARTILAGE: 120.0,
    Tissue.DISC: 85.0,
    Tissue.CSF: 15.0,
    Tissue.MEDIASTINAL_FAT: -90.0,
    Tissue.HEART: 42.0,
    Tissue.LIVER: 58.0,
    Tissue.SPLEEN: 47.0,
    Tissue.STOMACH: 20.0,
    Tissue.GAS: -1000.0,
    Tissue.LUNG: -875.0,
}
#: Unenhanced blood (pulmonary vessels, aorta) in HU.
BLOOD_HU = 42.0
#: Airway wall (cartilage, mucosa) in HU; the lumen is air.
AIRWAY_WALL_HU = 30.0
#: Oesophageal wall in HU.
OESOPHAGUS_HU = 38.0
#: Lung density rises from front to back in a supine patient (gravity-dependent
#: perfusion and partial atelectasis); half the front-to-back difference in HU.
LUNG_GRADIENT_HU = 35.0
#: Fat kept between the lungs and mediastinal structures (mm), so the lungs never touch
#: a vessel wall directly (the pleura and mediastinal fat lie in between).
MEDIASTINAL_MARGIN_MM = 3.0

#: Lung labels in the truth mask.
RIGHT_LUNG = 1
LEFT_LUNG = 2


#: Exponent of the rounded-rectangle (super-ellipse) cross-sections of body and cavity.
SHAPE_EXPONENT = 2.4
#: Points sampled in each lung to grow its trees (more points: more, finer branches).
ARTERY_POINTS = 900
VEIN_POINTS = 700
AIRWAY_POINTS = 120
#: Smallest radius (mm) drawn for vessels and airways; independent of the grid, so a
#: seed gives the same anatomy at every resolution.
VESSEL_MIN_RADIUS_MM = 0.45
AIRWAY_MIN_RADIUS_MM = 1.0


def _smoothstep(u: np.ndarray | float, lo: float, hi: float) -> np.ndarray:
    t = np.clip((np.asarray(u, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class ChestModel:
    """Shape parameters of one synthetic chest (mm, patient coordinates).

    Drawn once per seed by :meth:`draw`; every anatomical test below is a pure function
    of these numbers and of a point's coordinates, so the same chest can be rendered on
    any grid.
    """

    x_c: float  #: body midline (patient x)
    y_c: float  #: body centre (patient y)
    z_apex: float  #: patient z of the lung apices (u = 0)
    lung_height: float  #: apex to deepest recess (mm)
    cavity_a: float  #: half width of the thoracic cavity at its widest
    cavity_b: float  #: half depth of the thoracic cavity at its deepest
    rib_mm: float
    muscle_mm: float
    fat_mm: float
    rib_pitch: float
    rib_phase: float
    rib_drop: float  #: how much lower (mm) a rib's front end is than its back end
    vert_pitch: float
    vert_phase: float
    vert_radius: float
    heart_centre: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    heart_angle: float
    dome_right: float  #: u of the right hemidiaphragm dome
    dome_left: float
    mediastinum_half_width: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> ChestModel:
        """Draw a chest: sizes vary by about +-10 % around an average adult."""
        lat = rng.uniform(0.9, 1.08)
        ap = rng.uniform(0.9, 1.1)
        height = 235.0 * rng.uniform(0.92, 1.05)
        z_apex = rng.uniform(-160.0, -90.0)
        x_c = rng.uniform(-6.0, 6.0)
        y_c = rng.uniform(-12.0, 4.0)
        heart_u = rng.uniform(0.64, 0.7)
        return cls(
            x_c=x_c,
            y_c=y_c,
            z_apex=z_apex,
            lung_height=height,
            cavity_a=132.0 * lat,
            cavity_b=88.0 * ap,
            rib_mm=rng.uniform(8.0, 10.0),
            muscle_mm=rng.uniform(8.0, 14.0),
            fat_mm=rng.uniform(10.0, 28.0),
            rib_pitch=rng.uniform(23.0, 27.0) * height / 235.0,
            rib_phase=rng.uniform(0.0, 1.0),
            rib_drop=rng.uniform(55.0, 80.0),
            vert_pitch=rng.uniform(24.0, 28.0) * height / 235.0,
            vert_phase=rng.uniform(0.0, 1.0),
            vert_radius=16.0 * lat,
            heart_centre=(
                x_c + rng.uniform(18.0, 28.0) * lat,
                y_c - rng.uniform(12.0, 20.0) * ap,
                z_apex - heart_u * height,
            ),
            heart_axes=(
                rng.uniform(56.0, 66.0) * lat,
                rng.uniform(44.0, 52.0) * ap,
                rng.uniform(0.2, 0.24) * height,
            ),
            heart_angle=float(np.deg2rad(rng.uniform(30.0, 45.0))),
            dome_right=rng.uniform(0.7, 0.76),
            dome_left=rng.uniform(0.76, 0.82),
            mediastinum_half_width=rng.uniform(9.0, 12.0) * lat,
        )

    # -- coordinates -----------------------------------------------------------------
    def u_of_z(self, z: np.ndarray | float) -> np.ndarray:
        """Craniocaudal position: 0 at the apices, 1 at the deepest costophrenic recess."""
        return (self.z_apex - np.asarray(z, dtype=np.float64)) / self.lung_height

    def z_of_u(self, u: float) -> float:
        return float(self.z_apex - u * self.lung_height)

    @property
    def y_cavity(self) -> float:
        """Cavity centre: the anterior chest wall (pectoral muscles) is thicker."""
        return self.y_c + 6.0

    @property
    def x_mid(self) -> float:
        """Mediastinal midline (slightly left: the heart and aorta)."""
        return self.x_c + 4.0

    def cavity_axes(self, u: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Half width and half depth of the thoracic cavity; narrower at the thoracic inlet."""
        a = self.cavity_a * (0.5 + 0.5 * _smoothstep(u, -0.15, 0.45))
        b = self.cavity_b * (0.75 + 0.25 * _smoothstep(u, -0.15, 0.45))
        return a, b

    def mediastinum_width(self, u: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Half width of the midline band: wider below the arch, narrow in front (the
        anterior junction, where the lungs almost meet behind the sternum)."""
        widen = 1.0 + 0.8 * _smoothstep(u, 0.1, 0.35)
        front = 0.45 + 0.55 * _smoothstep(y, self.y_cavity - 0.7 * self.cavity_b, self.y_cavity - 0.1 * self.cavity_b)
        return self.mediastinum_half_width * widen * front

    def vertebra_y(self, u: np.ndarray | float) -> np.ndarray:
        """Centre (patient y) of the vertebral body; the lungs reach behind it on both sides."""
        _, b = self.cavity_axes(u)
        return self.y_cavity + b - self.vert_radius - 10.0

    def apex_u(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """u of the top of the lung above (x, y): one paraboloid cap per apex."""
        r_ap = 0.45 * self.cavity_a
        x_ap = np.where(x < self.x_mid, self.x_mid - 0.4 * self.cavity_a, self.x_mid + 0.4 * self.cavity_a)
        y_ap = self.y_cavity + 0.15 * self.cavity_b
        return 0.2 * (((x - x_ap) / r_ap) ** 2 + ((y - y_ap) / r_ap) ** 2)

    def diaphragm_u(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """u of the diaphragm surface under (x, y): two domes, the right one higher."""
        right = x < self.x_mid
        dome = np.where(right, self.dome_right, self.dome_left)
        x_d = np.where(right, self.x_mid - 0.5 * self.cavity_a, self.x_mid + 0.5 * self.cavity_a)
        y_d = self.y_cavity - 0.1 * self.cavity_b
        r_d = 0.9 * self.cavity_a
        return dome + 0.28 * (((x - x_d) / r_d) ** 2 + ((y - y_d) / r_d) ** 2)

    def in_heart(self, x: np.ndarray, y: np.ndarray, z: np.ndarray | float, margin: float = 0.0) -> np.ndarray:
        """Inside the heart ellipsoid (long axis turned to the left front), grown by ``margin``."""
        cx, cy, cz = self.heart_centre
        ax, ay, az = (v + margin for v in self.heart_axes)
        c, s = np.float32(np.cos(self.heart_angle)), np.float32(np.sin(self.heart_angle))
        dx = x - np.float32(cx)
        dy = y - np.float32(cy)
        xr = (dx * c - dy * s) / np.float32(ax)
        yr = (dx * s + dy * c) / np.float32(ay)
        zr = (np.asarray(z, dtype=np.float32) - np.float32(cz)) / np.float32(az)
        return xr * xr + yr * yr + zr * zr < 1.0

    def heart_spans(self, z: float, margin: float = 0.0) -> bool:
        """Whether the slice at ``z`` cuts the heart (grown by ``margin``)."""
        return abs(z - self.heart_centre[2]) < self.heart_axes[2] + margin

    # -- lung envelope ----------------------------------------------------------------
    def lung_side(
        self,
        x: np.ndarray,
        y: np.ndarray,
        z: np.ndarray | float,
        *,
        apex_u: np.ndarray | None = None,
        diaphragm_u: np.ndarray | None = None,
    ) -> np.ndarray:
        """Which lung a point lies in (0 none, 1 right, 2 left); broadcasts x, y, z.

        The lung envelope: inside the cavity, outside the mediastinal band, the heart and
        the vertebral body (with the posterior elements behind it), below the apical cap
        and above the diaphragm. The great vessels and central airways are cut out of the
        voxel mask by :func:`render_anatomy`. ``apex_u`` and ``diaphragm_u`` may be
        passed precomputed for (x, y) (they do not depend on z).
        """
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32)
        u = np.asarray(self.u_of_z(z), dtype=np.float32)
        a, b = self.cavity_axes(u)
        p = SHAPE_EXPONENT
        dxc = x - np.float32(self.x_c)
        inside = (np.abs(dxc) / a) ** p + (np.abs(y - np.float32(self.y_cavity)) / b) ** p < 1.0
        right = x < self.x_mid
        inside &= np.abs(x - np.float32(self.x_mid)) > self.mediastinum_width(u, y)
        vy = self.vertebra_y(u)
        r_excl = self.vert_radius + 8.0
        inside &= ~((dxc * dxc + (y - vy) ** 2 < r_excl**2) | ((np.abs(dxc) < self.vert_radius + 4.0) & (y > vy)))
        inside &= u >= (self.apex_u(x, y) if apex_u is None else apex_u)
        inside &= u <= (self.diaphragm_u(x, y) if diaphragm_u is None else diaphragm_u)
        margin = MEDIASTINAL_MARGIN_MM + 1.0
        if np.ndim(z) > 0 or self.heart_spans(float(z), margin):
            inside &= ~self.in_heart(x, y, z, margin=margin)
        return np.where(inside, np.where(right, RIGHT_LUNG, LEFT_LUNG), 0).astype(np.uint8)

    def sample_lung_points(
        self, rng: np.random.Generator, side: int, n: int, u_range: tuple[float, float] = (0.0, 1.05)
    ) -> np.ndarray:
        """``n`` points uniformly distributed in one lung envelope (rejection sampling)."""
        if side == RIGHT_LUNG:
            x_lo, x_hi = self.x_c - self.cavity_a, self.x_mid
        else:
            x_lo, x_hi = self.x_mid, self.x_c + self.cavity_a
        lo = np.array([x_lo, self.y_cavity - self.cavity_b, self.z_of_u(u_range[1])])
        hi = np.array([x_hi, self.y_cavity + self.cavity_b, self.z_of_u(u_range[0])])
        found: list[np.ndarray] = []
        count = 0
        for _ in range(100):
            pts = lo + (hi - lo) * rng.random((4 * n, 3))
            keep = pts[self.lung_side(pts[:, 0], pts[:, 1], pts[:, 2]) == side]
            found.append(keep)
            count += len(keep)
            if count >= n:
                break
        pts = np.concatenate(found)[:n]
        if len(pts) < n:
            raise RuntimeError(f"could not sample {n} points in lung {side}; the chest model is degenerate")
        return pts

    # -- tubes --------------------------------------------------------------------------
    def _p(self, x: float, y: float, u: float) -> tuple[float, float, float]:
        return (x, y, self.z_of_u(u))

    def mediastinal_tubes(self) -> dict[str, Segments]:
        """Great vessels, trachea, main bronchi and oesophagus as capsule chains."""
        xm = self.x_mid
        yc = self.y_cavity
        lat = self.cavity_a / 132.0
        vy = float(self.vertebra_y(0.5))
        carina_u = 0.3
        w = float(self.mediastinum_half_width * 1.8)
        tubes: dict[str, Segments] = {}
        tubes["trachea"] = Segments.polyline(
            [self._p(xm - 2, yc - 8, -0.5), self._p(xm - 1, yc - 4, 0.1), self._p(xm, yc, carina_u)], 10.0
        )
        tubes["right_main_bronchus"] = Segments.polyline(
            [self._p(xm, yc, carina_u), self._p(xm - w - 18 * lat, yc + 4, carina_u + 0.1)], 7.5
        )
        tubes["left_main_bronchus"] = Segments.polyline(
            [self._p(xm, yc, carina_u), self._p(xm + w + 24 * lat, yc + 8, carina_u + 0.14)], 6.5
        )
        tubes["oesophagus"] = Segments.polyline(
            [self._p(xm + 3, yc + 16, -0.5), self._p(xm + 6, vy - 22, 0.6), self._p(xm + 20, vy - 40, 1.0)], 8.0
        )
        tubes["aorta"] = Segments.polyline(
            [
                self._p(xm - 12, yc - 28, 0.6),
                self._p(xm - 10, yc - 26, 0.3),
                self._p(xm - 4, yc - 16, 0.2),
                self._p(xm + 8, yc + 2, 0.18),
                self._p(xm + 18, vy - 26, 0.24),
                self._p(xm + 20, vy - 22, 0.5),
                self._p(xm + 14, vy - 20, 1.4),
            ],
            [15.0, 14.0, 13.0, 13.0, 12.5, 12.0],
        )
        tubes["arch_branches"] = Segments.concat(
            [
                Segments.polyline([self._p(xm - 6, yc - 18, 0.2), self._p(xm - 16, yc - 20, -0.5)], 6.5),
                Segments.polyline([self._p(xm + 2, yc - 8, 0.19), self._p(xm + 6, yc - 12, -0.5)], 4.5),
                Segments.polyline([self._p(xm + 10, yc + 2, 0.19), self._p(xm + 22, yc + 4, -0.5)], 5.0),
            ]
        )
        tubes["superior_vena_cava"] = Segments.polyline(
            [self._p(xm - 34, yc - 18, -0.5), self._p(xm - 30, yc - 14, 0.52)], 10.0
        )
        bif = self._p(xm + 8, yc - 10, 0.38)
        tubes["pulmonary_arteries"] = Segments.concat(
            [
                Segments.polyline([self._p(xm + 18, yc - 36, 0.52), bif], 13.0),
                Segments.polyline([bif, self._p(xm - w - 10 * lat, yc + 2, 0.42)], 10.0),
                Segments.polyline([bif, self._p(xm + w + 14 * lat, yc + 10, 0.36)], 10.0),
            ]
        )
        la = self._p(xm + 6, yc + 12, 0.56)
        tubes["pulmonary_veins"] = Segments.concat(
            [Segments.polyline([la, self._p(xm - w - 10 * lat, yc + 10, s)], 7.0) for s in (0.48, 0.6)]
            + [Segments.polyline([la, self._p(xm + w + 10 * lat, yc + 12, s)], 7.0) for s in (0.46, 0.6)]
        )
        return tubes

    def intrapulmonary_trees(self, rng: np.random.Generator, tubes: dict[str, Segments]) -> tuple[Segments, Segments]:
        """Pulmonary arteries and veins (one result) and bronchi (the other).

        Each tree starts where its mediastinal tube enters the hilum and supplies points
        spread through its lung (veins: the upper and lower half separately).
        """
        vessel_style = TreeStyle(r_min=VESSEL_MIN_RADIUS_MM)
        airway_style = TreeStyle(r_min=AIRWAY_MIN_RADIUS_MM, step_fraction=(0.3, 0.5))
        arteries = tubes["pulmonary_arteries"]
        veins = tubes["pulmonary_veins"]
        bronchi = {RIGHT_LUNG: tubes["right_main_bronchus"].p1[-1], LEFT_LUNG: tubes["left_main_bronchus"].p1[-1]}
        artery_root = {RIGHT_LUNG: arteries.p1[1], LEFT_LUNG: arteries.p1[2]}
        vessel_parts: list[Segments] = []
        airway_parts: list[Segments] = []
        for side, vein_ends in ((RIGHT_LUNG, veins.p1[:2]), (LEFT_LUNG, veins.p1[2:])):
            pts = self.sample_lung_points(rng, side, ARTERY_POINTS)
            vessel_parts.append(territory_tree(rng, artery_root[side], pts, 7.0, vessel_style))
            pts = self.sample_lung_points(rng, side, VEIN_POINTS)
            split = 0.5 * (self.u_of_z(vein_ends[0][2]) + self.u_of_z(vein_ends[1][2]))
            upper = self.u_of_z(pts[:, 2]) < split
            for end, part in ((vein_ends[0], pts[upper]), (vein_ends[1], pts[~upper])):
                if len(part):
                    radius = 6.0 * (len(part) / VEIN_POINTS) ** (1.0 / 3.0)
                    vessel_parts.append(territory_tree(rng, end, part, radius, vessel_style))
            pts = self.sample_lung_points(rng, side, AIRWAY_POINTS)
            airway_parts.append(territory_tree(rng, bronchi[side], pts, 5.5, airway_style))
        return Segments.concat(vessel_parts), Segments.concat(airway_parts)


@dataclass
class Anatomy:
    """The anatomy of one phantom on its grid, before tumours and noise.

    Attributes
    ----------
    hu
        float32 ``(z, y, x)`` CT numbers (blur and noise not yet applied).
    tissue
        uint8 :class:`Tissue` map (vessels and airways are blended into ``hu`` only).
    lungs
        uint8 lung labels (1 right, 2 left): the lung volume of interest, vessels and
        small airways inside included, trachea and main bronchi excluded.
    body
        bool mask of the patient (not the table).
    model
        The shape parameters.
    n_vessel_segments, n_airway_segments
        Size of the rendered trees (for logs and reports).
    """

    hu: np.ndarray
    tissue: np.ndarray
    lungs: np.ndarray
    body: np.ndarray
    model: ChestModel
    n_vessel_segments: int
    n_airway_segments: int


@dataclass(frozen=True)
class _Plane:
    """What is the same on every slice: coordinates, the wall layers, apex and dome heights."""

    x: np.ndarray  # (1, nx) float32
    y: np.ndarray  # (ny, 1) float32
    dxc: np.ndarray  # x - midline, (1, nx)
    dxp: np.ndarray  # |x - midline| ** p, (1, nx)
    dyp_cav: np.ndarray  # |y - cavity centre| ** p, (ny, 1)
    phi: np.ndarray  # angle around the cavity centre / pi: 0 back, 1 front, (ny, nx)
    wall: np.ndarray  # tissue of table, skin, fat and muscle, (ny, nx) uint8
    apex_u: np.ndarray
    diaphragm_u: np.ndarray


def _plane(model: ChestModel, geometry: VolumeGeometry) -> _Plane:
    nz, ny, nx = geometry.shape_zyx
    x = geometry.x_mm().reshape(1, nx)
    y = geometry.y_mm().reshape(ny, 1)
    p = SHAPE_EXPONENT
    dxc = x - np.float32(model.x_c)
    dxp = np.abs(dxc) ** p
    wall = np.zeros((ny, nx), dtype=np.uint8)
    layers = model.rib_mm + model.muscle_mm + model.fat_mm
    # Body: fixed width (shoulder girdle above, abdomen below), flatter at the back.
    a_body = model.cavity_a + layers
    dy = y - np.float32(model.y_c)
    b_body = np.where(dy > 0, model.cavity_b + layers - 6.0, model.cavity_b + layers + 6.0).astype(np.float32)
    dyp = np.abs(dy) ** p

    def inside(shrink: float) -> np.ndarray:
        return dxp / np.float32(a_body - shrink) ** p + dyp / (b_body - shrink) ** p < 1.0

    wall[inside(0.0)] = Tissue.SKIN
    wall[inside(2.0)] = Tissue.FAT
    wall[inside(model.fat_mm)] = Tissue.MUSCLE
    # Table under the back: two carbon shells around foam.
    y_table = model.y_c + model.cavity_b + layers - 6.0 + 1.5
    in_x = np.abs(dxc) < 215.0
    depth = np.broadcast_to(y - np.float32(y_table), wall.shape)
    in_x = np.broadcast_to(in_x, wall.shape)
    wall[in_x & (((depth >= 0) & (depth < 3)) | ((depth >= 28) & (depth < 31)))] = Tissue.TABLE_SHELL
    wall[in_x & (depth >= 3) & (depth < 28)] = Tissue.TABLE_FOAM
    phi = (np.arctan2(np.abs(dxc), y - np.float32(model.y_cavity)) / np.pi).astype(np.float32)
    return _Plane(
        x=x,
        y=y,
        dxc=dxc,
        dxp=dxp,
        dyp_cav=np.abs(y - np.float32(model.y_cavity)) ** p,
        phi=phi,
        wall=wall,
        apex_u=model.apex_u(x, y).astype(np.float32),
        diaphragm_u=model.diaphragm_u(x, y).astype(np.float32),
    )


def _paint_slice(model: ChestModel, plane: _Plane, z: float, cut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tissue classes and lung labels of the axial slice at ``z`` (``cut``: mediastinal tubes)."""
    u = float(model.u_of_z(z))
    x, y, dxc, phi = plane.x, plane.y, plane.dxc, plane.phi
    tissue = plane.wall.copy()
    p = SHAPE_EXPONENT
    a_c, b_c = (float(v) for v in model.cavity_axes(u))
    s_cav = plane.dxp / np.float32(a_c**p) + plane.dyp_cav / np.float32(b_c**p)
    cavity = s_cav < 1.0
    tissue[cavity] = Tissue.MEDIASTINAL_FAT

    lungs = model.lung_side(x, y, z, apex_u=plane.apex_u, diaphragm_u=plane.diaphragm_u)
    lungs[cut] = 0
    tissue[lungs > 0] = Tissue.LUNG

    # Paraspinal muscles beside the spinous processes.
    vy = float(model.vertebra_y(u))
    r_v = model.vert_radius
    y_canal = vy + r_v + 7.0
    for side in (-1.0, 1.0):
        ell = ((dxc - side * 26.0) / 22.0) ** 2 + ((y - y_canal - 16.0) / 20.0) ** 2 < 1.0
        tissue[ell & (tissue != Tissue.LUNG) & (plane.wall >= Tissue.SKIN)] = Tissue.MUSCLE

    # Ribs: a ring outside the cavity where the sloping rib bands cross this slice.
    if -0.05 < u < 1.2:
        a_r, b_r = np.float32((a_c + model.rib_mm) ** p), np.float32((b_c + model.rib_mm) ** p)
        s_rib = plane.dxp / a_r + plane.dyp_cav / b_r
        ring = ~cavity & (s_rib < 1.0)
        height = 0.42 * model.rib_pitch
        phase = np.mod((z - model.z_apex + model.rib_drop * phi) / model.rib_pitch + model.rib_phase, 1.0)
        # Oval rib section: across the ring (t) and along the band (q), both in [-1, 1];
        # s_cav grows by about p * thickness / axis across the ring.
        across = (s_cav - 1.0) / np.float32(p * model.rib_mm * 0.5 * (1.0 / a_c + 1.0 / b_c))
        t = 2.0 * np.clip(across, 0.0, 1.0) - 1.0
        q = 2.0 * phase / np.float32(height / model.rib_pitch) - 1.0
        oval = t * t + q * q
        bone = ring & (phase < height / model.rib_pitch) & (phi > 0.13) & (oval < 1.0)
        cartilage = bone & (phi > 0.84) & (phi < 0.93)
        bone &= phi <= 0.84
        tissue[bone] = Tissue.BONE_CORTEX
        tissue[bone & (oval < 0.45)] = Tissue.BONE_MARROW
        tissue[cartilage] = Tissue.CARTILAGE

    # Sternum in front of the cavity.
    if 0.08 < u < 0.8:
        st = (dxc / 15.0) ** 2 + ((y - (model.y_cavity - b_c - 7.0)) / 6.5) ** 2
        tissue[st < 1.0] = Tissue.BONE_CORTEX
        tissue[st < 0.45] = Tissue.BONE_MARROW

    # Vertebra: body (or disc), canal, arch, spinous and transverse processes.
    v_phase = ((z - model.z_apex) / model.vert_pitch + model.vert_phase) % 1.0
    r2 = dxc * dxc + (y - vy) ** 2
    if v_phase < 0.2:
        tissue[r2 < r_v**2] = Tissue.DISC
    else:
        tissue[r2 < r_v**2] = Tissue.BONE_CORTEX
        tissue[r2 < (r_v - 2.0) ** 2] = Tissue.BONE_MARROW
    rc2 = dxc * dxc + (y - y_canal) ** 2
    if 0.3 < v_phase < 0.9:
        arch = (rc2 < 12.5**2) & (y > vy + r_v - 1.0)
        spinous = (np.abs(dxc) < 3.5) & (y > y_canal + 8.0) & (y < y_canal + 36.0)
        transverse = (np.abs(y - y_canal - 1.0) < 4.0) & (np.abs(dxc) < 34.0)
        processes = (arch | spinous | transverse) & (tissue != Tissue.LUNG) & (plane.wall >= Tissue.SKIN)
        tissue[processes] = Tissue.BONE_CORTEX
    tissue[rc2 < 7.0**2] = Tissue.CSF

    # Below the diaphragm: liver on the right (its left lobe crossing in front), stomach
    # under the left dome with gas floating in front (supine), spleen behind it.
    below = cavity & (u > plane.diaphragm_u) & (r2 > (r_v + 2.0) ** 2) & (tissue == Tissue.MEDIASTINAL_FAT)
    if below.any():
        xm = model.x_mid
        a, b = model.cavity_a, model.cavity_b
        du_st = (u - (model.dome_left + 0.14)) / 0.12
        du_sp = (u - (model.dome_left + 0.2)) / 0.14
        dy = y - model.y_cavity
        stomach = below & (((x - xm - 0.4 * a) / (0.3 * a)) ** 2 + ((dy + 0.25 * b) / (0.42 * b)) ** 2 + du_st**2 < 1.0)
        spleen = below & (((x - xm - 0.62 * a) / (0.2 * a)) ** 2 + ((dy - 0.45 * b) / (0.45 * b)) ** 2 + du_sp**2 < 1.0)
        liver = below & (x < xm + 25.0 + 0.6 * np.clip(model.y_cavity - y, 0.0, None)) & ~stomach & ~spleen
        tissue[below] = Tissue.FAT
        tissue[liver] = Tissue.LIVER
        tissue[spleen] = Tissue.SPLEEN
        tissue[stomach] = Tissue.STOMACH
        tissue[stomach & (y < model.y_cavity - 0.45 * b)] = Tissue.GAS
    if model.heart_spans(z):
        tissue[model.in_heart(x, y, z)] = Tissue.HEART
    lungs[tissue != Tissue.LUNG] = 0
    return tissue, lungs


def render_anatomy(geometry: VolumeGeometry, model: ChestModel, rng: np.random.Generator) -> Anatomy:
    """Render ``model`` on ``geometry`` (see the module docstring for what is drawn).

    Parameters
    ----------
    geometry
        The grid.
    model
        Chest shape parameters (:meth:`ChestModel.draw`).
    rng
        Random source for the vessel and airway trees.

    Returns
    -------
    Anatomy
        HU without blur or noise, tissue map, lung labels and body mask.
    """
    nz = geometry.shape_zyx[0]
    zs = geometry.z_mm()
    plane = _plane(model, geometry)

    tubes = model.mediastinal_tubes()
    central_airways = Segments.concat(
        [tubes["trachea"], tubes["right_main_bronchus"], tubes["left_main_bronchus"]]
    )
    # Everything mediastinal, grown by a fat margin, is cut out of the lungs.
    med = np.zeros(geometry.shape_zyx, dtype=bool)
    rasterize_segments(med, geometry, Segments.concat(list(tubes.values())), margin=MEDIASTINAL_MARGIN_MM)

    tissue = np.empty(geometry.shape_zyx, dtype=np.uint8)
    lungs = np.empty(geometry.shape_zyx, dtype=np.uint8)
    for k in range(nz):
        tissue[k], lungs[k] = _paint_slice(model, plane, float(zs[k]), med[k])

    lut = np.zeros(256, dtype=np.float32)
    for kind, value in TISSUE_HU.items():
        lut[kind] = value
    hu = lut[tissue]
    # Gravity-dependent lung density (supine): denser towards the back.
    grad = (LUNG_GRADIENT_HU * np.clip((plane.y - model.y_cavity) / model.cavity_b, -1.0, 1.0)).astype(np.float32)
    in_lung = lungs > 0
    hu += in_lung * grad

    # Mediastinal tubes: vessels and the oesophagus are solid, airways have an air lumen.
    great_vessels = ("aorta", "arch_branches", "superior_vena_cava", "pulmonary_arteries", "pulmonary_veins")
    blend_segments(hu, geometry, Segments.concat([tubes[name] for name in great_vessels]), BLOOD_HU)
    blend_segments(hu, geometry, tubes["oesophagus"], OESOPHAGUS_HU)
    blend_segments(hu, geometry, tubes["oesophagus"].scaled_radius(0.25), TISSUE_HU[Tissue.AIR])
    blend_segments(hu, geometry, central_airways, AIRWAY_WALL_HU)
    blend_segments(hu, geometry, central_airways.scaled_radius(0.8), TISSUE_HU[Tissue.AIR])

    # Intrapulmonary trees, drawn only in the lungs and the hilar tubes they leave from.
    vessels, airways = model.intrapulmonary_trees(rng, tubes)
    allowed = in_lung | med
    blend_segments(hu, geometry, vessels, BLOOD_HU, allowed)
    blend_segments(hu, geometry, airways, AIRWAY_WALL_HU, allowed)
    blend_segments(hu, geometry, airways.scaled_radius(0.75), TISSUE_HU[Tissue.AIR], allowed)

    body = (tissue != Tissue.AIR) & (tissue != Tissue.TABLE_SHELL) & (tissue != Tissue.TABLE_FOAM)
    logger.debug(
        "anatomy rendered: %d vessel and %d airway segments, lungs %d voxels",
        len(vessels), len(airways), int(np.count_nonzero(in_lung)),
    )
    return Anatomy(
        hu=hu,
        tissue=tissue,
        lungs=lungs,
        body=body,
        model=model,
        n_vessel_segments=len(vessels),
        n_airway_segments=len(airways),
    )
