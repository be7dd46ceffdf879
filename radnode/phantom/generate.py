"""Make a phantom: the volume in memory (:func:`synthesize_volume`) or on disk
(:func:`generate_phantom`: a DICOM CT series plus ground truth).

The steps, in order, each with its own random stream (see
:mod:`radnode.phantom.parameters`):

1. draw the chest (:class:`ChestModel`) and place the scan on it: a scan long enough
   for the whole lung starts 10 mm above the apices, a shorter one is a slab centred on
   the middle of the lungs;
2. render the anatomy (:func:`render_anatomy`) and blur it with the scanner's PSF;
3. draw the mutation label, the tumour designs, place and paint the tumours;
4. add correlated noise, round to integer HU in the range the DICOM files can store.

Output folder layout of :func:`generate_phantom`::

    DIR/ct/CT_0001.dcm ...     CT Image Storage series, slice 1 is the most inferior
    DIR/truth/tumor.nii.gz     uint8, tumour i labelled i (0 background)
    DIR/truth/lungs.nii.gz     uint8, 1 right lung, 2 left lung
    DIR/truth/labels.json      tumours, mutation, geometry, UIDs, options
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radnode import __version__
from radnode.phantom.anatomy import LEFT_LUNG, RIGHT_LUNG, ChestModel, render_anatomy
from radnode.phantom.dicom_series import HU_MAX, HU_MIN, PHANTOM_NOTE, SeriesHeader, write_ct_series
from radnode.phantom.geometry import VolumeGeometry
from radnode.phantom.identity import series_header
from radnode.phantom.lesions import MutationEffect, TumorInfo, draw_design, place_and_paint
from radnode.phantom.parameters import PhantomParameters, Stream
from radnode.phantom.scanner import add_noise, blur_in_plane, default_noise_hu
from radnode.phantom.truth import LABELS_SCHEMA, to_sitk, write_label_image, write_labels_json

logger = logging.getLogger(__name__)

#: Margin (mm) between the top slice and the lung apices when the scan covers the lungs.
APEX_MARGIN_MM = 10.0
CT_DIR = "ct"
TRUTH_DIR = "truth"
TUMOR_FILE = "tumor.nii.gz"
LUNGS_FILE = "lungs.nii.gz"
LABELS_FILE = "labels.json"


@dataclass
class SyntheticVolume:
    """A phantom in memory.

    Attributes
    ----------
    hu
        int16 ``(z, y, x)`` CT numbers, exactly what the DICOM files store after rescale.
    lungs
        uint8 lung labels (1 right, 2 left), tumours and vessels inside included, trachea
        and main bronchi excluded.
    tumors
        uint8 tumour labels (tumour ``i`` is ``i``): exactly the voxels the tumours set.
    tissue
        uint8 :class:`radnode.phantom.anatomy.Tissue` map of the anatomy.
    geometry
        The grid in patient coordinates.
    tumor_info
        One record per tumour, in label order.
    mutation
        The planted label (0 wild type, 1 mutant).
    applied_effect
        Mutation effect strength applied to the tumours (0 for wild type).
    noise_hu
        Noise standard deviation in the patient.
    parameters
        The options.
    model
        The chest's shape parameters.
    """

    hu: np.ndarray
    lungs: np.ndarray
    tumors: np.ndarray
    tissue: np.ndarray
    geometry: VolumeGeometry
    tumor_info: list[TumorInfo]
    mutation: int
    applied_effect: float
    noise_hu: float
    parameters: PhantomParameters
    model: ChestModel

    def image(self, which: str = "hu") -> Any:
        """``hu``, ``lungs`` or ``tumors`` as a SimpleITK image on the CT grid."""
        if which not in ("hu", "lungs", "tumors"):
            raise ValueError(f"image() takes 'hu', 'lungs' or 'tumors'; got {which!r}")
        return to_sitk(getattr(self, which), self.geometry)


@dataclass(frozen=True)
class PhantomResult:
    """What :func:`generate_phantom` wrote."""

    out_dir: Path
    ct_dir: Path
    ct_files: tuple[Path, ...]
    tumor_path: Path
    lungs_path: Path
    labels_path: Path
    labels: dict[str, Any]
    header: SeriesHeader
    volume: SyntheticVolume

    @property
    def study_instance_uid(self) -> str:
        return self.header.study_instance_uid

    @property
    def series_instance_uid(self) -> str:
        return self.header.series_instance_uid


def scan_geometry(model: ChestModel, params: PhantomParameters) -> VolumeGeometry:
    """Place the scan on the chest (see the module docstring)."""
    thickness = params.slice_thickness
    coverage = params.slices * thickness
    if coverage >= model.lung_height + 2 * APEX_MARGIN_MM:
        z_top = model.z_apex + APEX_MARGIN_MM
    else:
        z_top = model.z_of_u(0.5) + (coverage - thickness) / 2.0
    return VolumeGeometry.centred(
        params.slices, params.matrix, params.resolved_pixel_spacing, thickness, z_top
    )


def synthesize(params: PhantomParameters) -> SyntheticVolume:
    """Build the phantom described by ``params`` in memory (no files)."""
    start = time.perf_counter()
    rng = params.rng(Stream.ANATOMY)
    model = ChestModel.draw(rng)
    geometry = scan_geometry(model, params)
    anatomy = render_anatomy(geometry, model, rng)
    hu = blur_in_plane(anatomy.hu, geometry)

    mutation = params.draw_mutation()
    effect = MutationEffect(params.mutation_effect if mutation else 0.0)
    design_rng = params.rng(Stream.TUMOR_DESIGN)
    designs = [draw_design(design_rng, kind, params.tumor_diameter_mm) for kind in params.tumor_kinds(design_rng)]
    tumors, infos = place_and_paint(
        params.rng(Stream.PLACEMENT), designs, effect, mutation, hu, anatomy.lungs, anatomy.tissue, geometry
    )

    noise = default_noise_hu(geometry) if params.noise_hu is None else params.noise_hu
    add_noise(hu, anatomy.body, geometry, params.rng(Stream.NOISE), noise)
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    volume = SyntheticVolume(
        hu=hu.astype(np.int16),
        lungs=anatomy.lungs,
        tumors=tumors,
        tissue=anatomy.tissue,
        geometry=geometry,
        tumor_info=infos,
        mutation=mutation,
        applied_effect=effect.strength,
        noise_hu=float(noise),
        parameters=params,
        model=model,
    )
    logger.info(
        "phantom synthesised: grid %s, %d tumour(s), %.2f s",
        geometry.shape_zyx, len(infos), time.perf_counter() - start,
    )
    return volume


def synthesize_volume(seed: int, slices: int = 100, tumors: int = 1, **options: Any) -> SyntheticVolume:
    """Build a phantom in memory: HU volume, masks and geometry, no files.

    Parameters
    ----------
    seed
        Seed (0 .. 2**32 - 1); equal options give an identical volume.
    slices
        Number of axial slices.
    tumors
        Number of tumours (0 .. 20).
    **options
        Further :class:`PhantomParameters` fields: ``matrix`` (512), ``pixel_spacing``
        (360 mm / matrix), ``slice_thickness`` (2.5 mm), ``mutation`` (0, 1, "random" or
        a probability), ``mutation_effect`` (1.0), ``tumor_types``, ``tumor_diameter_mm``
        ((10, 35)), ``noise_hu`` (18 HU at 0.7 x 0.7 x 2.5 mm, scaled with voxel size),
        ``patient_id``, ``patient_name``.

    Returns
    -------
    SyntheticVolume
        int16 HU ``(z, y, x)``, lung and tumour labels, geometry, tumour records.

    Raises
    ------
    ValueError
        For an option out of range.
    RuntimeError
        If the tumours do not fit in the lungs of the requested grid.
    """
    return synthesize(PhantomParameters(seed=seed, slices=slices, tumors=tumors, **options))


def _tumor_mean_hu(volume: SyntheticVolume) -> dict[int, float]:
    idx = np.flatnonzero(volume.tumors)
    if idx.size == 0:
        return {}
    labels = volume.tumors.ravel()[idx]
    values = volume.hu.ravel()[idx].astype(np.float64)
    sums = np.bincount(labels, weights=values)
    counts = np.bincount(labels)
    return {int(i): float(sums[i] / counts[i]) for i in np.nonzero(counts)[0]}


def labels_document(volume: SyntheticVolume, header: SeriesHeader) -> dict[str, Any]:
    """The content of ``labels.json``."""
    params = volume.parameters
    geometry = volume.geometry
    voxel_ml = geometry.voxel_volume_mm3 / 1000.0
    means = _tumor_mean_hu(volume)
    tumors = []
    for info in volume.tumor_info:
        entry = info.as_dict()
        entry["mean_hu"] = round(means.get(info.index, float("nan")), 3)
        tumors.append(entry)
    return {
        "schema": LABELS_SCHEMA,
        "note": PHANTOM_NOTE,
        "generator": {"name": "radnode.phantom", "version": __version__},
        "seed": params.seed,
        "parameters": params.as_dict(),
        "coordinate_system": "DICOM patient coordinates (LPS), mm",
        "geometry": geometry.as_dict(),
        "uids": {
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "frame_of_reference_uid": header.frame_of_reference_uid,
        },
        "files": {"ct": f"../{CT_DIR}", "tumor": TUMOR_FILE, "lungs": LUNGS_FILE},
        "noise_hu": round(volume.noise_hu, 3),
        "lungs": {
            "labels": {str(RIGHT_LUNG): "right lung", str(LEFT_LUNG): "left lung"},
            "definition": "lung parenchyma with the vessels, small airways and tumours inside it; "
            "trachea, main bronchi and mediastinum excluded",
            "volume_ml": {
                "right": round(float(np.count_nonzero(volume.lungs == RIGHT_LUNG)) * voxel_ml, 3),
                "left": round(float(np.count_nonzero(volume.lungs == LEFT_LUNG)) * voxel_ml, 3),
            },
        },
        "mutation": {
            "label": volume.mutation,
            "probability": params.mutation_probability,
            "mutation_effect": params.mutation_effect,
            "applied_effect": volume.applied_effect,
            "effect": MutationEffect.describe(),
        },
        "tumors": tumors,
    }


def _prepare(out_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    ct_dir = out_dir / CT_DIR
    truth_dir = out_dir / TRUTH_DIR
    existing = sorted(ct_dir.glob("*.dcm")) if ct_dir.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"{ct_dir} already holds {len(existing)} DICOM files; choose an empty output folder "
            "or pass overwrite=True (CLI: --overwrite)"
        )
    if overwrite:
        if ct_dir.is_dir():
            shutil.rmtree(ct_dir)
        for name in (TUMOR_FILE, LUNGS_FILE, LABELS_FILE):
            (truth_dir / name).unlink(missing_ok=True)
    ct_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    return ct_dir, truth_dir


def generate_phantom(
    out_dir: Path, seed: int, slices: int = 100, tumors: int = 1, *, overwrite: bool = False, **options: Any
) -> PhantomResult:
    """Write a synthetic chest CT series and its ground truth under ``out_dir``.

    Parameters
    ----------
    out_dir
        Output folder (layout in the module docstring).
    seed, slices, tumors, **options
        As for :func:`synthesize_volume`.
    overwrite
        Replace an earlier phantom in ``out_dir`` (its ``ct/`` folder and truth files).

    Returns
    -------
    PhantomResult
        Paths, the labels document, the DICOM header values and the volume.

    Raises
    ------
    FileExistsError
        If ``out_dir/ct`` already holds DICOM files and ``overwrite`` is false.
    ValueError, RuntimeError
        As for :func:`synthesize_volume`.
    """
    params = PhantomParameters(seed=seed, slices=slices, tumors=tumors, **options)
    out_dir = Path(out_dir)
    ct_dir, truth_dir = _prepare(out_dir, overwrite)
    volume = synthesize(params)
    header = series_header(params, volume.geometry.shape_zyx[0])
    files = write_ct_series(volume.hu, volume.geometry, header, ct_dir)
    tumor_path = write_label_image(volume.tumors, volume.geometry, truth_dir / TUMOR_FILE)
    lungs_path = write_label_image(volume.lungs, volume.geometry, truth_dir / LUNGS_FILE)
    document = labels_document(volume, header)
    labels_path = write_labels_json(document, truth_dir / LABELS_FILE)
    logger.info("phantom series %s written to %s", header.series_instance_uid, out_dir)
    return PhantomResult(
        out_dir=out_dir,
        ct_dir=ct_dir,
        ct_files=tuple(files),
        tumor_path=tumor_path,
        lungs_path=lungs_path,
        labels_path=labels_path,
        labels=document,
        header=header,
        volume=volume,
    )
