"""radnode's radiomics on the IBSI 1 CT phantom vs the IBSI reference values (configs A-D).

Writes the Markdown table that ``docs/ibsi.md`` embeds::

    .venv/bin/python benchmarks/ibsi_table.py            # prints the tables
    .venv/bin/python benchmarks/ibsi_table.py --out FILE # also writes them to FILE

Each configuration is translated into pyradiomics settings (the closest pyradiomics can
come to the IBSI definition; the differences are flagged per row and listed in
docs/ibsi.md) and run through radnode's own extraction path
(:func:`radnode.models.radiomics.extract_region`, fast exact shape included) on the NIfTI
image and GTV mask of the phantom. Config E is left out: it combines a range and a
mean ± 3 SD re-segmentation, and pyradiomics applies one re-segmentation mode only.

Data: ``../shared/data/ibsi_ct_phantom`` (or ``$RADNODE_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# benchmarks/radiomics.py shares its name with the pyradiomics package; run as a script
# from this folder it would shadow that package, so the folder is dropped from the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _HERE]

import SimpleITK as sitk

from radnode.models.radiomics import extract_region, profile_from_settings

REPO = Path(__file__).resolve().parents[1]

#: pyradiomics settings per IBSI 1 configuration, and the texture aggregation tag suffix
#: that matches how pyradiomics aggregates (3-D: per-direction matrices, features averaged;
#: force2D: per in-plane direction, merged over slices, averaged over directions = 2.5-D).
CONFIGS: dict[str, dict] = {
    "A": {
        "title": "A: 2-D, no interpolation, range [-500, 400] HU, fixed bin size 25 HU",
        "settings": {"force2D": True, "force2Ddimension": 0, "resegmentRange": [-500, 400], "binWidth": 25},
        "suffix_avg": "2_5D_avg", "suffix_zone": "2_5D",
    },
    "B": {
        "title": "B: 2-D, in-plane 2 × 2 mm (linear), range [-500, 400] HU, fixed bin number 32",
        "settings": {
            "force2D": True, "force2Ddimension": 0, "resampledPixelSpacing": [2.0, 2.0, 0.0],
            "interpolator": "sitkLinear", "resegmentRange": [-500, 400], "binCount": 32,
        },
        "suffix_avg": "2_5D_avg", "suffix_zone": "2_5D",
    },
    "C": {
        "title": "C: 3-D, isotropic 2 mm (linear), range [-1000, 400] HU, fixed bin size 25 HU",
        "settings": {
            "resampledPixelSpacing": [2.0, 2.0, 2.0], "interpolator": "sitkLinear",
            "resegmentRange": [-1000, 400], "binWidth": 25,
        },
        "suffix_avg": "3D_avg", "suffix_zone": "3D", "bins_flag": True,
    },
    "D": {
        "title": "D: 3-D, isotropic 2 mm (linear), outliers outside mean ± 3 SD removed, fixed bin number 32",
        "settings": {
            "resampledPixelSpacing": [2.0, 2.0, 2.0], "interpolator": "sitkLinear",
            "resegmentRange": [-3, 3], "resegmentMode": "sigma", "binCount": 32,
        },
        "suffix_avg": "3D_avg", "suffix_zone": "3D",
    },
}

#: IBSI tag (without aggregation suffix) → pyradiomics feature (original image).
MORPH = {
    "morph_volume": "shape_MeshVolume", "morph_vol_approx": "shape_VoxelVolume",
    "morph_area_mesh": "shape_SurfaceArea", "morph_av": "shape_SurfaceVolumeRatio",
    "morph_sphericity": "shape_Sphericity", "morph_diam": "shape_Maximum3DDiameter",
    "morph_pca_maj_axis": "shape_MajorAxisLength", "morph_pca_min_axis": "shape_MinorAxisLength",
    "morph_pca_least_axis": "shape_LeastAxisLength", "morph_pca_elongation": "shape_Elongation",
    "morph_pca_flatness": "shape_Flatness",
}
STAT = {
    "stat_mean": "firstorder_Mean", "stat_var": "firstorder_Variance", "stat_skew": "firstorder_Skewness",
    "stat_kurt": "firstorder_Kurtosis", "stat_median": "firstorder_Median", "stat_min": "firstorder_Minimum",
    "stat_p10": "firstorder_10Percentile", "stat_p90": "firstorder_90Percentile", "stat_max": "firstorder_Maximum",
    "stat_iqr": "firstorder_InterquartileRange", "stat_range": "firstorder_Range",
    "stat_mad": "firstorder_MeanAbsoluteDeviation", "stat_rmad": "firstorder_RobustMeanAbsoluteDeviation",
    "stat_energy": "firstorder_Energy", "stat_rms": "firstorder_RootMeanSquared",
    "ih_entropy": "firstorder_Entropy", "ih_uniformity": "firstorder_Uniformity",
}
GLCM = {
    "cm_joint_max": "MaximumProbability", "cm_joint_avg": "JointAverage", "cm_joint_var": "SumSquares",
    "cm_joint_entr": "JointEntropy", "cm_diff_avg": "DifferenceAverage", "cm_diff_var": "DifferenceVariance",
    "cm_diff_entr": "DifferenceEntropy", "cm_sum_avg": "SumAverage", "cm_sum_entr": "SumEntropy",
    "cm_energy": "JointEnergy", "cm_contrast": "Contrast", "cm_dissimilarity": "DifferenceAverage",
    "cm_inv_diff": "Id", "cm_inv_diff_norm": "Idn", "cm_inv_diff_mom": "Idm", "cm_inv_diff_mom_norm": "Idmn",
    "cm_inv_var": "InverseVariance", "cm_corr": "Correlation", "cm_auto_corr": "Autocorrelation",
    "cm_clust_tend": "ClusterTendency", "cm_clust_shade": "ClusterShade", "cm_clust_prom": "ClusterProminence",
    "cm_info_corr1": "Imc1", "cm_info_corr2": "Imc2",
}
GLRLM = {
    "rlm_sre": "ShortRunEmphasis", "rlm_lre": "LongRunEmphasis", "rlm_lgre": "LowGrayLevelRunEmphasis",
    "rlm_hgre": "HighGrayLevelRunEmphasis", "rlm_srlge": "ShortRunLowGrayLevelEmphasis",
    "rlm_srhge": "ShortRunHighGrayLevelEmphasis", "rlm_lrlge": "LongRunLowGrayLevelEmphasis",
    "rlm_lrhge": "LongRunHighGrayLevelEmphasis", "rlm_glnu": "GrayLevelNonUniformity",
    "rlm_glnu_norm": "GrayLevelNonUniformityNormalized", "rlm_rlnu": "RunLengthNonUniformity",
    "rlm_rlnu_norm": "RunLengthNonUniformityNormalized", "rlm_r_perc": "RunPercentage",
    "rlm_gl_var": "GrayLevelVariance", "rlm_rl_var": "RunVariance", "rlm_rl_entr": "RunEntropy",
}
GLSZM = {
    "szm_sze": "SmallAreaEmphasis", "szm_lze": "LargeAreaEmphasis", "szm_lgze": "LowGrayLevelZoneEmphasis",
    "szm_hgze": "HighGrayLevelZoneEmphasis", "szm_szlge": "SmallAreaLowGrayLevelEmphasis",
    "szm_szhge": "SmallAreaHighGrayLevelEmphasis", "szm_lzlge": "LargeAreaLowGrayLevelEmphasis",
    "szm_lzhge": "LargeAreaHighGrayLevelEmphasis", "szm_glnu": "GrayLevelNonUniformity",
    "szm_glnu_norm": "GrayLevelNonUniformityNormalized", "szm_zsnu": "SizeZoneNonUniformity",
    "szm_zsnu_norm": "SizeZoneNonUniformityNormalized", "szm_z_perc": "ZonePercentage",
    "szm_gl_var": "GrayLevelVariance", "szm_zs_var": "ZoneVariance", "szm_zs_entr": "ZoneEntropy",
}
NGTDM = {
    "ngt_coarseness": "Coarseness", "ngt_contrast": "Contrast", "ngt_busyness": "Busyness",
    "ngt_complexity": "Complexity", "ngt_strength": "Strength",
}
GLDM = {
    "ngl_lde": "SmallDependenceEmphasis", "ngl_hde": "LargeDependenceEmphasis",
    "ngl_lgce": "LowGrayLevelEmphasis", "ngl_hgce": "HighGrayLevelEmphasis",
    "ngl_ldlge": "SmallDependenceLowGrayLevelEmphasis", "ngl_ldhge": "SmallDependenceHighGrayLevelEmphasis",
    "ngl_hdlge": "LargeDependenceLowGrayLevelEmphasis", "ngl_hdhge": "LargeDependenceHighGrayLevelEmphasis",
    "ngl_glnu": "GrayLevelNonUniformity", "ngl_dcnu": "DependenceNonUniformity",
    "ngl_dcnu_norm": "DependenceNonUniformityNormalized", "ngl_gl_var": "GrayLevelVariance",
    "ngl_dc_var": "DependenceVariance", "ngl_dc_entr": "DependenceEntropy",
}

#: Known definition differences between pyradiomics and IBSI, flagged per row (key in the notes list).
FLAGS = {
    "kurt": "K: pyradiomics Kurtosis is not excess kurtosis (IBSI value + 3)",
    "grid": "G: resampling grid aligned to the image origin (IBSI: grid centres aligned), mask by nearest "
            "neighbour (IBSI: linear + 0.5 threshold), intensities not rounded to integer HU",
    "mesh": "M: mesh on the nearest-neighbour-resampled mask (IBSI: linearly interpolated mask)",
    "agg2d": "D: force2D textures are merged over slices per in-plane direction (IBSI 2.5-D, "
             "direction-averaged; the 2-D by-slice reference is not reproducible in pyradiomics)",
    "bins": "B: fixed-bin-size bins start at the multiple of the bin width below the ROI minimum "
            "(IBSI: at the re-segmentation lower bound, -1000 HU), so bin indices are shifted by a constant "
            "and features that weight by gray level differ",
    "dep": "N: pyradiomics GLDM with alpha 0 and distance 1 stands for IBSI NGLDM (coarseness 0, Chebyshev 1)",
}


@dataclass(frozen=True)
class Row:
    """One compared feature."""

    tag: str
    feature: str
    reference: float
    tolerance: float
    value: float
    flags: tuple[str, ...]

    @property
    def deviation(self) -> float:
        return self.value - self.reference

    @property
    def within(self) -> bool:
        return abs(self.deviation) <= self.tolerance + 1e-12 * max(1.0, abs(self.reference))


def data_dir() -> Path:
    """The shared test data folder."""
    override = os.environ.get("RADNODE_SHARED_DATA")
    return Path(override) if override else REPO.parent / "shared" / "data"


def reference_values(config: str, root: Path | None = None) -> dict[str, tuple[float, float]]:
    """IBSI tag → (reference value, tolerance) for one configuration (tags without a value left out)."""
    path = (root or data_dir()) / "ibsi_ct_phantom" / "reference_values" / f"ibsi_1_chest_config_{config.lower()}.csv"
    out: dict[str, tuple[float, float]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter=";"):
            if row["reference value"].strip():
                out[row["tag"]] = (float(row["reference value"]), float(row["tolerance"]))
    return out


def tag_map(config: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """IBSI tag (with this configuration's suffix) → (radnode feature name, flags)."""
    spec = CONFIGS[config]
    resampled = "resampledPixelSpacing" in spec["settings"]
    two_d = spec["settings"].get("force2D", False)
    grid = ("grid",) if resampled else ()
    agg = ("agg2d",) if two_d else ()
    bins = ("bins",) if spec.get("bins_flag") else ()
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for tag, name in MORPH.items():
        out[tag] = (f"original_{name}", ("mesh",) if resampled else ())
    for tag, name in STAT.items():
        extra = ("kurt",) if tag == "stat_kurt" else bins if tag.startswith("ih_") else ()
        out[tag] = (f"original_{name}", grid + extra)
    for tag, name in GLCM.items():
        out[f"{tag}_{spec['suffix_avg']}"] = (f"original_glcm_{name}", grid + bins + agg)
    for tag, name in GLRLM.items():
        out[f"{tag}_{spec['suffix_avg']}"] = (f"original_glrlm_{name}", grid + bins + agg)
    for tag, name in GLSZM.items():
        out[f"{tag}_{spec['suffix_zone']}"] = (f"original_glszm_{name}", grid + bins + agg)
    for tag, name in NGTDM.items():
        out[f"{tag}_{spec['suffix_zone']}"] = (f"original_ngtdm_{name}", grid + bins + agg)
    for tag, name in GLDM.items():
        out[f"{tag}_{spec['suffix_zone']}"] = (f"original_gldm_{name}", grid + bins + agg + ("dep",))
    return out


def phantom(root: Path | None = None) -> tuple[sitk.Image, sitk.Image]:
    """The IBSI CT phantom image (HU) and GTV mask as SimpleITK images."""
    folder = (root or data_dir()) / "ibsi_ct_phantom" / "nifti"
    return sitk.ReadImage(str(folder / "image" / "phantom.nii.gz")), sitk.ReadImage(str(folder / "mask" / "mask.nii.gz"))


def compute(config: str, root: Path | None = None) -> tuple[list[Row], float]:
    """radnode's values for one configuration, paired with the references; and the seconds taken."""
    image, mask = phantom(root)
    settings = {"label": 1, "additionalInfo": False, **CONFIGS[config]["settings"]}
    profile = profile_from_settings(settings, name=f"ibsi-{config.lower()}")
    start = time.perf_counter()
    result = extract_region(image, mask, profile, region="gtv")
    seconds = time.perf_counter() - start
    if result.status != "done":
        raise RuntimeError(f"IBSI config {config}: extraction {result.status}: {result.notes}")
    refs = reference_values(config, root)
    rows = []
    for tag, (feature, flags) in tag_map(config).items():
        if tag in refs and feature in result.features:
            ref, tol = refs[tag]
            rows.append(Row(tag, feature, ref, tol, result.features[feature], flags))
    return rows, seconds


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if 1e-3 <= abs(v) < 1e6 else f"{v:.3e}"


def markdown(config: str, rows: list[Row], seconds: float) -> str:
    """One configuration's table."""
    inside = sum(r.within for r in rows)
    lines = [
        f"### Config {CONFIGS[config]['title']}",
        "",
        f"{inside} of {len(rows)} features within the IBSI tolerance ({seconds:.1f} s).",
        "",
        "| IBSI tag | radnode (pyradiomics) feature | reference ± tolerance | radnode | deviation | within | flags |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flags = " ".join(FLAGS[f].split(":")[0] for f in r.flags)
        lines.append(
            f"| {r.tag} | {r.feature} | {_fmt(r.reference)} ± {_fmt(r.tolerance)} | {_fmt(r.value)} | "
            f"{_fmt(r.deviation)} | {'yes' if r.within else '**no**'} | {flags} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    parser.add_argument("--configs", default="ABCD", help="configurations to run (default ABCD)")
    args = parser.parse_args(argv)
    parts = ["Flags: " + "; ".join(FLAGS.values()) + ".", ""]
    for config in args.configs.upper():
        rows, seconds = compute(config)
        parts.append(markdown(config, rows, seconds))
        print(f"config {config}: {sum(r.within for r in rows)}/{len(rows)} within tolerance", file=sys.stderr)
    text = "\n".join(parts)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
