"""Write a phantom volume as a CT Image Storage series (PS3.3 A.3, PS3.10 file format).

One file per axial slice, Explicit VR Little Endian (PS3.5 A.2), with every module of
the CT Image IOD that a PACS, a viewer or radnode's own reader relies on:

* Patient (C.7.1.1), General Study (C.7.2.1), Patient Study (C.7.2.2);
* General Series (C.7.3.1) with Patient Position HFS (Type 2C for CT);
* Frame of Reference (C.7.4.1); General Equipment (C.7.5.1) naming radnode as the
  manufacturer; General Acquisition (C.7.10.1);
* General Image (C.7.6.1), Image Plane (C.7.6.2), Image Pixel (C.7.6.3), CT Image
  (C.8.2.1), VOI LUT (C.11.2) with a lung and a mediastinal window, SOP Common (C.12.1).

Image Type is ``ORIGINAL\\PRIMARY\\AXIAL`` because the series stands in for a scanner's
primary axial reconstruction (input checks commonly skip derived and localizer
images); Series Description and Image Comments say that it is a phantom.

Pixels are stored unsigned, 12 of 16 bits, with Rescale Intercept -1024 and slope 1
(HU = stored - 1024), as most scanners do, so a reader that forgets the rescale is
caught at once. Every value comes from the arguments: writing the same volume with the
same header twice gives byte-identical files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from radnode.phantom.geometry import AXIAL_ORIENTATION, VolumeGeometry

logger = logging.getLogger(__name__)

#: Stored value = HU - RESCALE_INTERCEPT (PS3.3 C.11.1.1.2).
RESCALE_INTERCEPT = -1024
#: Bits Stored: 0..4095 holds -1024..3071 HU (PS3.3 C.8.2.1.1.4 allows 12 or 16 for CT).
BITS_STORED = 12
#: Lowest and highest HU the stored range can hold.
HU_MIN = RESCALE_INTERCEPT
HU_MAX = RESCALE_INTERCEPT + 2**BITS_STORED - 1
#: (centre, width, explanation) of the windows offered to viewers (PS3.3 C.11.2.1.2).
WINDOWS: tuple[tuple[int, int, str], ...] = ((-600, 1500, "LUNG"), (40, 400, "MEDIASTINUM"))
#: Manufacturer (General Equipment, PS3.3 C.7.5.1).
MANUFACTURER = "radnode-phantom"
MODEL_NAME = "radnode synthetic chest CT"
#: Says in the header itself that the images are not of a patient.
PHANTOM_NOTE = "PHANTOM - synthetic, not a patient"


@dataclass(frozen=True)
class SeriesHeader:
    """Identifiers and acquisition values of one synthetic series.

    All dates are ``YYYYMMDD`` (DA), times ``HHMMSS`` (TM); ``sop_instance_uids`` has
    one UID per slice, in slice order.
    """

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    patient_age: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    implementation_class_uid: str
    implementation_version_name: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    series_number: int
    series_description: str
    image_comments: str
    software_version: str
    device_serial_number: str
    kvp: float = 120.0
    tube_current_ma: int = 200
    exposure_time_ms: int = 500
    convolution_kernel: str = "STANDARD"
    revolution_time_s: float = 0.5
    spiral_pitch: float = 0.984


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters (PS3.5 6.2)."""
    return format_number_as_ds(float(value))


def _slice_dataset(
    header: SeriesHeader, geometry: VolumeGeometry, k: int, pixels: np.ndarray
) -> Dataset:
    sop_uid = UID(header.sop_instance_uids[k])
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(header.implementation_class_uid)
    meta.ImplementationVersionName = header.implementation_version_name

    ds = Dataset()
    ds.file_meta = meta
    # SOP Common
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = header.study_date
    ds.InstanceCreationTime = header.study_time
    # Patient, Patient Study
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = header.patient_birth_date
    ds.PatientSex = header.patient_sex
    ds.PatientAge = header.patient_age
    # General Study
    ds.StudyInstanceUID = header.study_instance_uid
    ds.StudyDate = header.study_date
    ds.StudyTime = header.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = header.study_id
    ds.AccessionNumber = header.accession_number
    ds.StudyDescription = "CT CHEST (synthetic phantom)"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = header.series_instance_uid
    ds.SeriesNumber = header.series_number
    ds.SeriesDate = header.study_date
    ds.SeriesTime = header.study_time
    ds.SeriesDescription = header.series_description
    ds.ProtocolName = "CHEST"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    # Frame of Reference
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "radnode synthetic data"
    ds.StationName = "PHANTOM"
    ds.ManufacturerModelName = MODEL_NAME
    ds.DeviceSerialNumber = header.device_serial_number
    ds.SoftwareVersions = header.software_version
    # General Acquisition, General Image
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = header.study_date
    ds.AcquisitionTime = header.study_time
    ds.ContentDate = header.study_date
    ds.ContentTime = header.study_time
    ds.InstanceNumber = k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageComments = header.image_comments
    ds.BurnedInAnnotation = "NO"
    # Image Plane
    sx, sy, sz = geometry.spacing_xyz
    position = geometry.slice_position(k)
    ds.PixelSpacing = [_ds(sy), _ds(sx)]  # row spacing, column spacing
    ds.ImageOrientationPatient = [_ds(v) for v in AXIAL_ORIENTATION]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceThickness = _ds(sz)
    ds.SliceLocation = _ds(position[2])
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    # CT Image
    ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = _ds(header.kvp)
    ds.ScanOptions = "HELICAL MODE"
    ds.DataCollectionDiameter = _ds(500.0)
    ds.ReconstructionDiameter = _ds(sx * geometry.shape_zyx[2])
    ds.DistanceSourceToDetector = _ds(1040.0)
    ds.DistanceSourceToPatient = _ds(570.0)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = _ds(160.0)
    ds.RotationDirection = "CW"
    ds.ExposureTime = header.exposure_time_ms
    ds.XRayTubeCurrent = header.tube_current_ma
    ds.Exposure = int(round(header.tube_current_ma * header.exposure_time_ms / 1000.0))
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = int(round(header.kvp * header.tube_current_ma / 1000.0))
    ds.FocalSpots = _ds(1.2)
    ds.ConvolutionKernel = header.convolution_kernel
    ds.RevolutionTime = float(header.revolution_time_s)  # FD
    ds.SpiralPitchFactor = float(header.spiral_pitch)  # FD
    # VOI LUT
    ds.WindowCenter = [_ds(c) for c, _, _ in WINDOWS]
    ds.WindowWidth = [_ds(w) for _, w, _ in WINDOWS]
    ds.WindowCenterWidthExplanation = [name for _, _, name in WINDOWS]
    ds.PixelData = pixels.astype("<u2", copy=False).tobytes()
    return ds


def hu_to_stored(hu: np.ndarray) -> np.ndarray:
    """Stored pixel values (uint16) for HU, clipped to the range Bits Stored can hold."""
    return (np.clip(hu.astype(np.int32), HU_MIN, HU_MAX) - RESCALE_INTERCEPT).astype(np.uint16)


def write_ct_series(
    hu: np.ndarray, geometry: VolumeGeometry, header: SeriesHeader, out_dir: Path
) -> list[Path]:
    """Write ``hu`` (int16, ``(z, y, x)``) as one CT file per slice into ``out_dir``.

    Parameters
    ----------
    hu
        CT numbers on ``geometry``; values outside ``[HU_MIN, HU_MAX]`` are clipped.
    geometry
        Grid: pixel spacing, slice positions, orientation.
    header
        Identifiers and acquisition values; needs one SOP Instance UID per slice.
    out_dir
        Folder to write ``CT_0001.dcm`` ... into (created if missing).

    Returns
    -------
    list[pathlib.Path]
        The files, in slice (and Instance Number) order.

    Raises
    ------
    ValueError
        If the volume does not match the grid or the header's UID count.
    """
    if hu.shape != geometry.shape_zyx:
        raise ValueError(f"volume shape {hu.shape} does not match the grid {geometry.shape_zyx}")
    if len(header.sop_instance_uids) != hu.shape[0]:
        raise ValueError(
            f"header has {len(header.sop_instance_uids)} SOP Instance UIDs for {hu.shape[0]} slices"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = hu_to_stored(hu)
    width = max(4, len(str(hu.shape[0])))
    paths: list[Path] = []
    for k in range(hu.shape[0]):
        path = out_dir / f"CT_{k + 1:0{width}d}.dcm"
        _slice_dataset(header, geometry, k, stored[k]).save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.info("wrote %d CT slices of series %s to %s", len(paths), header.series_instance_uid, out_dir)
    return paths

