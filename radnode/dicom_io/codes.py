"""Every coded concept radnode writes, in one place.

Standard codes come from SNOMED CT (``SCT``), DICOM (``DCM``, PS3.16 Annex D), LOINC
(``LN``), UCUM units and the IBSI feature codes (``IBSI``, as included in PS3.16 CID
7467/7468/7470/7475-7479/7500/7501). Where no standard code exists, radnode uses its own
private coding scheme :data:`RADNODE_SCHEME` (PS3.16 §8.2: private designators start with
``99``), declared in each object's Coding Scheme Identification Sequence (PS3.3
C.12.1.1.4) through :func:`radnode_coding_scheme`.

Private codes (scheme ``99RADNODE``, version 1)

========================  ==============================================================
code value                meaning
========================  ==============================================================
``PERITUMORAL``           Peritumoral region: the shell of lung parenchyma within 3 mm of
                          the tumour surface, tumour excluded. No SNOMED CT or DCM concept
                          exists for it; its category is SCT 309825002 "Spatial and
                          Relational Concept" and its anatomic region SCT 39607008 Lung.
``R`` + 10 hex digits     a radiomic feature without a standard code: the digits are the
                          first 10 of SHA-1 over the pyradiomics feature name, which is
                          the code meaning (e.g. ``original_firstorder_Mean``).
``P`` + endpoint          probability that a mutation/endpoint is present (e.g. ``PEGFR``).
``S`` + endpoint          the endpoint's status as the classifier calls it at its threshold
                          (e.g. ``SEGFR`` "EGFR status"; value SCT Positive / Negative).
``DEMO``                  "Demo model output, not for clinical use".
``CONTQUAL``              "Contour quality assessment": concept name of the qualitative
                          finding on a segment (radnode.models.quality); value
                          ``CQUNCERTAIN`` or ``CQACCEPTABLE``.
``CQUNCERTAIN``           "Contour uncertain, review required": the reference-free quality
                          score is below the model's calibrated threshold, or a competing
                          detection made the choice of structure a guess.
``CQACCEPTABLE``          "Contour quality acceptable": at or above that threshold.
``CQSCORE``               "Contour quality score" (0-1, UCUM "1"; no standard concept).
========================  ==============================================================
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

#: PS3.16 §8.2: private coding scheme designators begin with "99".
RADNODE_SCHEME = "99RADNODE"
RADNODE_SCHEME_VERSION = "1"


def radnode_coding_scheme() -> CodingSchemeIdentificationItem:
    """A fresh Coding Scheme Identification item declaring :data:`RADNODE_SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=RADNODE_SCHEME,
        name="radnode private codes",
        version=RADNODE_SCHEME_VERSION,
        responsible_organization="radnode project",
    )


# --- anatomy and findings (SNOMED CT) ---------------------------------------------------
LUNG = Code("39607008", "SCT", "Lung")
NEOPLASM = Code("108369006", "SCT", "Neoplasm")
NSCLC = Code("254637007", "SCT", "Non-small cell lung cancer")
LEFT = Code("7771000", "SCT", "Left")  # CID 244 Laterality
RIGHT = Code("24028007", "SCT", "Right")
CHEST = Code("816094009", "SCT", "Chest")
ABSENT = Code("2667000", "SCT", "Absent")
PRESENT = Code("52101004", "SCT", "Present")
#: Values of a classifier's qualitative finding (its class at the threshold).
POSITIVE = Code("10828004", "SCT", "Positive")
NEGATIVE = Code("260385009", "SCT", "Negative")

# CID 7150 Segmentation Property Categories
CATEGORY_ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
CATEGORY_MORPHOLOGICALLY_ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")
CATEGORY_SPATIAL_RELATIONAL = Code("309825002", "SCT", "Spatial and Relational Concept")

PERITUMORAL_REGION = Code("PERITUMORAL", RADNODE_SCHEME, "Peritumoral region")

# --- algorithm, procedure, report (DCM, LOINC) ------------------------------------------
#: CID 7162 Algorithm Family.
ALGORITHM_FAMILY_AI = Code("123110", "DCM", "Artificial Intelligence")
#: Procedure reported (TID 1500 row 4, CID 100 allows any procedure code).
PROCEDURE_CT_CHEST = Code("24627-2", "LN", "CT Chest")
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
TRACKING_TUMOUR_DETECTION = "Tumour detection"

# --- measurement concepts (TID 1419 / TID 300) ------------------------------------------
VOLUME = Code("118565006", "SCT", "Volume")
#: CID 7474 Volume measurement method.
SUM_OF_VOXELS = Code("126030", "DCM", "Sum of segmented voxel method for volume")
ATTENUATION_COEFFICIENT = Code("112031", "DCM", "Attenuation Coefficient")
#: CID 7464 General Region of Interest Measurement Modifiers.
MEAN = Code("373098007", "SCT", "Mean")
MINIMUM = Code("255605001", "SCT", "Minimum")
MAXIMUM = Code("56851009", "SCT", "Maximum")
MAX_3D_DIAMETER = Code("L0JK", "IBSI", "Maximum 3D Diameter of a Mesh")
SPHERICITY = Code("QCFX", "IBSI", "Sphericity")
PROBABILITY = Code("122157", "DCM", "Probability")
DEMO_OUTPUT = Code("DEMO", RADNODE_SCHEME, "Demo model output, not for clinical use")
DEMO_TEXT = "demo \u2014 not for clinical use"
NO_TUMOUR_TEXT = "no tumour found"
CONTOUR_QUALITY = Code("CONTQUAL", RADNODE_SCHEME, "Contour quality assessment")
CONTOUR_UNCERTAIN = Code("CQUNCERTAIN", RADNODE_SCHEME, "Contour uncertain, review required")
CONTOUR_ACCEPTABLE = Code("CQACCEPTABLE", RADNODE_SCHEME, "Contour quality acceptable")
CONTOUR_QUALITY_SCORE = Code("CQSCORE", RADNODE_SCHEME, "Contour quality score")
#: Which contour a group's measurements were made on: the clinician's GTV or radnode's own.
CONTOUR_SOURCE = Code("CSOURCE", RADNODE_SCHEME, "Source of segmentation")
CLINICIAN_CONTOUR = Code("CSCLINICIAN", RADNODE_SCHEME, "Clinician contour (RT Structure Set)")
MODEL_CONTOUR = Code("CSMODEL", RADNODE_SCHEME, "Automatic contour (radnode model)")
#: Agreement of radnode's tumour contour with the clinician's GTV.
AGREEMENT_DICE = Code("AGDICE", RADNODE_SCHEME, "Dice coefficient with clinician contour")
AGREEMENT_HD95 = Code("AGHD95", RADNODE_SCHEME, "95th percentile Hausdorff distance to clinician contour")
AGREEMENT_VOLUME_RATIO = Code("AGVOLRATIO", RADNODE_SCHEME, "Volume ratio model to clinician contour")

# --- units (UCUM, CID 7181) ---------------------------------------------------------------
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_MM2 = Code("mm2", "UCUM", "square millimeter")
UNIT_MM3 = Code("mm3", "UCUM", "cubic millimeter")
UNIT_PER_MM = Code("/mm", "UCUM", "per millimeter")
UNIT_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_NONE = Code("1", "UCUM", "no units")


@dataclass(frozen=True)
class FeatureConcept:
    """How one radiomic feature is coded in the SR: concept name and unit."""

    name: Code
    unit: Code


# pyradiomics feature class + name -> IBSI code (PS3.16 CIDs listed in the module
# docstring). Only features of the *original* image get standard codes: a filtered image
# (LoG, wavelet, ...) changes what the value means, so those use private codes.
_LENGTH = UNIT_MM
_IBSI_FEATURES: dict[tuple[str, str], tuple[str, str, Code]] = {
    # shape (CID 7477 / 7470 / 7472)
    ("shape", "MeshVolume"): ("RNU0", "Volume of Mesh", UNIT_MM3),
    ("shape", "VoxelVolume"): ("YEKZ", "Volume from Voxel Summation", UNIT_MM3),
    ("shape", "SurfaceArea"): ("C0JK", "Surface Area of Mesh", UNIT_MM2),
    ("shape", "SurfaceVolumeRatio"): ("2PR5", "Surface to Volume Ratio", UNIT_PER_MM),
    ("shape", "Sphericity"): ("QCFX", "Sphericity", UNIT_NONE),
    ("shape", "Compactness1"): ("SKGS", "Compactness 1", UNIT_NONE),
    ("shape", "Compactness2"): ("BQWJ", "Compactness 2", UNIT_NONE),
    ("shape", "SphericalDisproportion"): ("KRCK", "Spherical Disproportion", UNIT_NONE),
    ("shape", "Maximum3DDiameter"): ("L0JK", "Maximum 3D Diameter of a Mesh", _LENGTH),
    ("shape", "MajorAxisLength"): ("TDIC", "Major Axis in 3D Length", _LENGTH),
    ("shape", "MinorAxisLength"): ("P9VJ", "Minor Axis in 3D Length", _LENGTH),
    ("shape", "LeastAxisLength"): ("7J51", "Least Axis in 3D Length", _LENGTH),
    ("shape", "Elongation"): ("Q3CK", "Elongation", UNIT_NONE),
    ("shape", "Flatness"): ("N17B", "Flatness", UNIT_NONE),
    # first order on the discretised histogram (CID 7478)
    ("firstorder", "Entropy"): ("TLU2", "Intensity Histogram Entropy", UNIT_NONE),
    ("firstorder", "Uniformity"): ("BJ5W", "Intensity Histogram Uniformity", UNIT_NONE),
    # GLCM (CID 7467)
    ("glcm", "Autocorrelation"): ("QWB0", "Autocorrelation of GLCM", UNIT_NONE),
    ("glcm", "JointAverage"): ("60VM", "Joint Average of GLCM", UNIT_NONE),
    ("glcm", "SumAverage"): ("ZGXS", "Sum Average of GLCM", UNIT_NONE),
    ("glcm", "ClusterProminence"): ("AE86", "Cluster Prominence of GLCM", UNIT_NONE),
    ("glcm", "ClusterShade"): ("7NFM", "Cluster Shade of GLCM", UNIT_NONE),
    ("glcm", "ClusterTendency"): ("DG8W", "Cluster Tendency of GLCM", UNIT_NONE),
    ("glcm", "Contrast"): ("ACUI", "Contrast of GLCM", UNIT_NONE),
    ("glcm", "Correlation"): ("NI2N", "Correlation of GLCM", UNIT_NONE),
    ("glcm", "DifferenceAverage"): ("TF7R", "Difference Average of GLCM", UNIT_NONE),
    ("glcm", "DifferenceEntropy"): ("NTRS", "Difference Entropy of GLCM", UNIT_NONE),
    ("glcm", "DifferenceVariance"): ("D3YU", "Difference Variance of GLCM", UNIT_NONE),
    ("glcm", "JointEnergy"): ("8ZQL", "Angular Second Moment of GLCM", UNIT_NONE),
    ("glcm", "JointEntropy"): ("TU9B", "Joint Entropy of GLCM", UNIT_NONE),
    ("glcm", "Imc1"): ("R8DG", "First Measure of Information Correlation of GLCM", UNIT_NONE),
    ("glcm", "Imc2"): ("JN9H", "Second Measure of Information Correlation of GLCM", UNIT_NONE),
    ("glcm", "Idm"): ("WF0Z", "Inverse Difference Moment of GLCM", UNIT_NONE),
    ("glcm", "Idmn"): ("1QCO", "Normalized Inverse Difference Moment of GLCM", UNIT_NONE),
    ("glcm", "Id"): ("IB1Z", "Inverse Difference of GLCM", UNIT_NONE),
    ("glcm", "Idn"): ("NDRX", "Normalized Inverse Difference of GLCM", UNIT_NONE),
    ("glcm", "InverseVariance"): ("E8JP", "Inverse Variance of GLCM", UNIT_NONE),
    ("glcm", "MaximumProbability"): ("GYBY", "Joint Maximum of GLCM", UNIT_NONE),
    ("glcm", "SumEntropy"): ("P6QZ", "Sum Entropy of GLCM", UNIT_NONE),
    ("glcm", "SumSquares"): ("UR99", "Joint Variance of GLCM", UNIT_NONE),
    # GLRLM (CID 7475)
    ("glrlm", "ShortRunEmphasis"): ("22OV", "Short Runs Emphasis", UNIT_NONE),
    ("glrlm", "LongRunEmphasis"): ("W4KF", "Long Runs Emphasis", UNIT_NONE),
    ("glrlm", "GrayLevelNonUniformity"): ("R5YN", "Gray Level Nonuniformity in Runs", UNIT_NONE),
    ("glrlm", "GrayLevelNonUniformityNormalized"): (
        "OVBL", "Normalized Gray Level Nonuniformity in Runs", UNIT_NONE),
    ("glrlm", "RunLengthNonUniformity"): ("W92Y", "Run Length Nonuniformity", UNIT_NONE),
    ("glrlm", "RunLengthNonUniformityNormalized"): (
        "IC23", "Normalized Run Length Nonuniformity", UNIT_NONE),
    ("glrlm", "RunPercentage"): ("9ZK5", "Run Percentage", UNIT_NONE),
    ("glrlm", "GrayLevelVariance"): ("8CE5", "Gray Level Variance in Runs", UNIT_NONE),
    ("glrlm", "RunVariance"): ("SXLW", "Run Length Variance", UNIT_NONE),
    ("glrlm", "RunEntropy"): ("HJ9O", "Run Entropy", UNIT_NONE),
    ("glrlm", "LowGrayLevelRunEmphasis"): ("V3SW", "Low Gray Level Run Emphasis", UNIT_NONE),
    ("glrlm", "HighGrayLevelRunEmphasis"): ("G3QZ", "High Gray Level Run Emphasis", UNIT_NONE),
    ("glrlm", "ShortRunLowGrayLevelEmphasis"): (
        "HTZT", "Short Run Low Gray Level Emphasis", UNIT_NONE),
    ("glrlm", "ShortRunHighGrayLevelEmphasis"): (
        "GD3A", "Short Run High Gray Level Emphasis", UNIT_NONE),
    ("glrlm", "LongRunLowGrayLevelEmphasis"): (
        "IVPO", "Long Run Low Gray Level Emphasis", UNIT_NONE),
    ("glrlm", "LongRunHighGrayLevelEmphasis"): (
        "3KUM", "Long Run High Gray Level Emphasis", UNIT_NONE),
    # GLSZM (CID 7476)
    ("glszm", "SmallAreaEmphasis"): ("5QRC", "Small Zone Emphasis", UNIT_NONE),
    ("glszm", "LargeAreaEmphasis"): ("48P8", "Large Zone Emphasis", UNIT_NONE),
    ("glszm", "GrayLevelNonUniformity"): (
        "JNSA", "Gray Level Nonuniformity of Size Zone Counts", UNIT_NONE),
    ("glszm", "GrayLevelNonUniformityNormalized"): (
        "Y1RO", "Normalized Gray Level Nonuniformity of Size Zone Counts", UNIT_NONE),
    ("glszm", "SizeZoneNonUniformity"): ("4JP3", "Zone Size Nonuniformity", UNIT_NONE),
    ("glszm", "SizeZoneNonUniformityNormalized"): (
        "VB3A", "Normalized Zone Size Nonuniformity", UNIT_NONE),
    ("glszm", "ZonePercentage"): ("P30P", "Size Zone Percentage", UNIT_NONE),
    ("glszm", "GrayLevelVariance"): ("BYLV", "Gray Level Variance in Size Zones", UNIT_NONE),
    ("glszm", "ZoneVariance"): ("3NSA", "Zone Size Variance", UNIT_NONE),
    ("glszm", "ZoneEntropy"): ("GU8N", "Zone Size Entropy", UNIT_NONE),
    ("glszm", "LowGrayLevelZoneEmphasis"): ("XMSY", "Low Gray Level Zone Emphasis", UNIT_NONE),
    ("glszm", "HighGrayLevelZoneEmphasis"): ("5GN9", "High Gray Level Zone Emphasis", UNIT_NONE),
    ("glszm", "SmallAreaLowGrayLevelEmphasis"): (
        "5RAI", "Small Zone Low Gray Level Emphasis", UNIT_NONE),
    ("glszm", "SmallAreaHighGrayLevelEmphasis"): (
        "HW1V", "Small Zone High Gray Level Emphasis", UNIT_NONE),
    ("glszm", "LargeAreaLowGrayLevelEmphasis"): (
        "YH51", "Large Zone Low Gray Level Emphasis", UNIT_NONE),
    ("glszm", "LargeAreaHighGrayLevelEmphasis"): (
        "J17V", "Large Zone High Gray Level Emphasis", UNIT_NONE),
    # NGTDM (CID 7500)
    ("ngtdm", "Coarseness"): ("QCDE", "Coarseness of NGTDM", UNIT_NONE),
    ("ngtdm", "Contrast"): ("65HE", "Contrast of NGTDM", UNIT_NONE),
    ("ngtdm", "Busyness"): ("NQ30", "Busyness of NGTDM", UNIT_NONE),
    ("ngtdm", "Complexity"): ("HDEZ", "Complexity of NGTDM", UNIT_NONE),
    ("ngtdm", "Strength"): ("1X9X", "Strength of NGTDM", UNIT_NONE),
    # pyradiomics GLDM (alpha 0) = IBSI NGLDM (CID 7501)
    ("gldm", "SmallDependenceEmphasis"): ("SODN", "Low dependence emphasis", UNIT_NONE),
    ("gldm", "LargeDependenceEmphasis"): ("IMOQ", "High dependence emphasis", UNIT_NONE),
    ("gldm", "GrayLevelNonUniformity"): ("FP8K", "Grey level non-uniformity of NGLDM", UNIT_NONE),
    ("gldm", "DependenceNonUniformity"): ("Z87G", "Dependence count non-uniformity", UNIT_NONE),
    ("gldm", "DependenceNonUniformityNormalized"): (
        "OKJI", "Dependence count non-uniformity normalized", UNIT_NONE),
    ("gldm", "GrayLevelVariance"): ("1PFV", "Grey level variance of NGLDM", UNIT_NONE),
    ("gldm", "DependenceVariance"): ("DNX2", "Dependence count variance", UNIT_NONE),
    ("gldm", "DependenceEntropy"): ("FCBV", "Dependence count entropy", UNIT_NONE),
    ("gldm", "LowGrayLevelEmphasis"): ("TL9H", "Low grey level count emphasis", UNIT_NONE),
    ("gldm", "HighGrayLevelEmphasis"): ("OAE7", "High grey level count emphasis", UNIT_NONE),
    ("gldm", "SmallDependenceLowGrayLevelEmphasis"): (
        "EQ3F", "Low dependence low grey level emphasis", UNIT_NONE),
    ("gldm", "SmallDependenceHighGrayLevelEmphasis"): (
        "JA6D", "Low dependence high grey level emphasis", UNIT_NONE),
    ("gldm", "LargeDependenceLowGrayLevelEmphasis"): (
        "NBZI", "High dependence low grey level emphasis", UNIT_NONE),
    ("gldm", "LargeDependenceHighGrayLevelEmphasis"): (
        "9QMG", "High dependence high grey level emphasis", UNIT_NONE),
}

#: pyradiomics first-order features whose values are in the image's unit (HU for CT).
_HU_FIRSTORDER = frozenset(
    {
        "10Percentile", "90Percentile", "Maximum", "Mean", "Median", "Minimum", "Range",
        "InterquartileRange", "MeanAbsoluteDeviation", "RobustMeanAbsoluteDeviation",
        "RootMeanSquared",
    }
)
#: Longest CodeMeaning (LO, PS3.5 §6.2).
_MAX_MEANING = 64


def private_feature_code(name: str) -> Code:
    """The private code of a feature without a standard one (see module docstring)."""
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:10].upper()
    return Code(f"R{digest}", RADNODE_SCHEME, name[:_MAX_MEANING])


def feature_concept(name: str) -> FeatureConcept:
    """Code and unit for a radiomic feature given by its pyradiomics name.

    Parameters
    ----------
    name
        ``<image type>_<feature class>_<feature>``, e.g. ``original_glcm_Contrast``
        or ``wavelet-LLH_firstorder_Mean``.

    Returns
    -------
    FeatureConcept
        The IBSI code (PS3.16 CID 7467-7501) for features of the original image that
        have one, else a private ``99RADNODE`` code whose meaning is the name.
    """
    pieces = name.split("_", 2)
    if len(pieces) == 3:
        image_type, feature_class, feature = pieces
        if image_type == "original" and (feature_class, feature) in _IBSI_FEATURES:
            value, meaning, unit = _IBSI_FEATURES[(feature_class, feature)]
            return FeatureConcept(Code(value, "IBSI", meaning), unit)
        if feature_class == "firstorder" and feature in _HU_FIRSTORDER and image_type == "original":
            return FeatureConcept(private_feature_code(name), UNIT_HU)
        if feature_class == "firstorder" and feature in {"Energy", "TotalEnergy"}:
            return FeatureConcept(private_feature_code(name), UNIT_NONE)
    return FeatureConcept(private_feature_code(name), UNIT_NONE)


def _endpoint_key(endpoint: str) -> str:
    clean = "".join(ch for ch in endpoint.upper() if ch.isalnum())[:15]
    if not clean:
        raise ValueError(f"endpoint {endpoint!r} has no letters or digits to build a code from")
    return clean


def probability_code(endpoint: str) -> Code:
    """Private concept "probability of <endpoint>" (e.g. EGFR mutation present)."""
    return Code(f"P{_endpoint_key(endpoint)}", RADNODE_SCHEME, f"Probability of {endpoint} positive"[:_MAX_MEANING])


def status_code(endpoint: str) -> Code:
    """Private concept "<endpoint> status": the classifier's call at its threshold."""
    return Code(f"S{_endpoint_key(endpoint)}", RADNODE_SCHEME, f"{endpoint} status"[:_MAX_MEANING])
