"""Candidate radiomics engines against pyradiomics 3.0.1: features covered, agreement, speed.

Issue 10 ("A faster engine, proven equal") asks whether a faster engine can replace or
accelerate pyradiomics. This script checks every candidate that is importable in the
interpreter running it (``flash-radiomics``, ``pyradiomics-bhklab``, ``pyradiomics-cuda``,
``fastrad``); a missing one is reported, never an error (exit status 0).

Candidates must not enter radnode's own environment, so the script works across two
interpreters:

1. **Reference** (``--prepare DIR``, run under radnode's ``.venv`` with pyradiomics 3.0.1):
   writes the phantom CT and its three regions (tumour, 3 mm ring, whole lung) as NRRD,
   pyradiomics 3.0.1's values on the IBSI CT phantom (configuration A settings) and on
   the three regions, and the time of pyradiomics (serial, its own shape class) and of
   radnode's parallel extraction (:func:`radnode.models.radiomics.extract_regions`) on the
   three regions.
2. **Engines** (default, run under the engines' throwaway venv): compares each engine with
   pyradiomics' own lung1/lung2 baseline (``pyradiomics/baseline/*.csv``, each column with
   the settings it recorded) and with the reference JSON, and times it on the same regions.
   Without ``--reference DIR`` it runs step 1 itself with ``--radnode-python``.

Speed uses the region profiles' settings (``tumour-v1``, ``ring-v1``, ``lung-v1``) with the
original image only, or with ``--filters`` with all their image types except radnode's own
LBP-3D (which no engine has). ``flash-radiomics+adapted`` is flash-radiomics with the
adaptations its differences call for (:class:`FlashAdapted`).

    /tmp/engines/bin/python benchmarks/radiomics_engines.py [--filters] [--json OUT] [--engines flash-radiomics,...]

The machine is shared: the load average is printed with every timing.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import importlib
import importlib.metadata
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

# Run as a script, this folder would be sys.path[0] and its radiomics.py would shadow pyradiomics.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _HERE]

import SimpleITK as sitk

REPO = _HERE.parent
#: Agreement the issue asks for before an engine may serve a feature class.
TOLERANCE = 1e-4
#: Differences below this are floating-point noise around zero (e.g. an entropy of -3e-16 vs 0).
ABSOLUTE_FLOOR = 1e-12
CLASSES = ("firstorder", "glcm", "gldm", "glrlm", "glszm", "ngtdm", "shape", "shape2D")
REGION_PROFILES = {"tumour": "tumour-v1", "ring": "ring-v1", "lung": "lung-v1"}
#: IBSI 1 configuration A as radnode's reference test runs it (2-D texture, no interpolation).
IBSI_A_SETTINGS: dict[str, Any] = {
    "label": 1, "force2D": True, "force2Ddimension": 0, "resegmentRange": [-500, 400], "binWidth": 25,
}
ALL_3D = {c: None for c in ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")}
#: Engine name → (distribution name, module to import).
ENGINES: dict[str, tuple[str, str]] = {
    "flash-radiomics": ("flash-radiomics", "flash_radiomics.featureextractor"),
    "pyradiomics-bhklab": ("pyradiomics-bhklab", "radiomics.featureextractor"),
    "pyradiomics-cuda": ("pyradiomics-cuda", "radiomics.featureextractor"),
    "fastrad": ("fastrad", "fastrad"),
    # flash-radiomics with the two adaptations its differences call for (see FlashAdapted).
    "flash-radiomics+adapted": ("flash-radiomics", "flash_radiomics.featureextractor"),
}

logger = logging.getLogger(__name__)


def shared_data() -> Path:
    """``RADNODE_SHARED_DATA`` or ``../shared/data`` next to the repository."""
    override = os.environ.get("RADNODE_SHARED_DATA")
    return Path(override) if override else REPO.parent / "shared" / "data"


def relative(got: float, ref: float) -> float:
    """|got - ref| / |ref| (|got| where ref is 0); two NaNs agree, one NaN is infinitely off."""
    if math.isnan(ref) or math.isnan(got):
        return 0.0 if math.isnan(ref) and math.isnan(got) else math.inf
    if abs(got - ref) <= ABSOLUTE_FLOOR:
        return 0.0
    return abs(got - ref) / abs(ref) if ref != 0 else abs(got)


def load_avg() -> float:
    """1-minute load average (the machine is shared)."""
    return round(os.getloadavg()[0], 2)


# --- reference side (radnode's venv) ------------------------------------------------------------------


def prepare(folder: Path, seed: int, filters: bool) -> None:
    """Write the regions, pyradiomics 3.0.1 reference values and reference timings to ``folder``."""
    import numpy as np

    from radnode.models.radiomics import (
        extract_region,
        extract_regions,
        load_profile,
        profile_from_settings,
    )
    from radnode.models.radiomics.extract import Profile
    from radnode.models.regions import build_regions
    from radnode.phantom import synthesize_volume

    folder.mkdir(parents=True, exist_ok=True)
    volume = synthesize_volume(seed=seed, slices=100, tumors=1)
    image = volume.image("hu")
    regions = build_regions(volume.tumors > 0, volume.lungs > 0, image.GetSpacing()[::-1]).masks()
    sitk.WriteImage(image, str(folder / "image.nrrd"), True)
    for name, mask in regions.items():
        label = sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))
        label.CopyInformation(image)
        sitk.WriteImage(label, str(folder / f"{name}.nrrd"), True)

    out: dict[str, Any] = {"pyradiomics": importlib.metadata.version("pyradiomics"), "case": f"phantom seed {seed}",
                           "voxels": {k: int(np.count_nonzero(v)) for k, v in regions.items()}}
    ibsi = shared_data() / "ibsi_ct_phantom" / "nifti"
    profile = profile_from_settings(IBSI_A_SETTINGS, name="ibsi-a", fast_shape=False)
    result = extract_region(sitk.ReadImage(str(ibsi / "image" / "phantom.nii.gz")),
                            sitk.ReadImage(str(ibsi / "mask" / "mask.nii.gz")), profile, region="gtv")
    out["ibsi"] = result.features

    profiles = {k: speed_profile(load_profile(v), filters) for k, v in REGION_PROFILES.items()}
    out["region_params"] = {k: p.params for k, p in profiles.items()}
    out["image_types"] = {k: list(p.params["imageType"]) for k, p in profiles.items()}
    pure = {k: Profile(p.name, p.version, p.description, p.params, False, p.min_voxels) for k, p in profiles.items()}
    out["timings"] = {}
    load = load_avg()
    serial = extract_regions(image, regions, pure, parallel=False)
    out["regions"] = {k: r.features for k, r in serial.regions.items()}
    out["timings"]["pyradiomics 3.0.1 serial"] = {
        "regions": {k: round(r.seconds, 2) for k, r in serial.regions.items()},
        "total": round(serial.wall_seconds, 2), "load": [load, load_avg()]}
    load = load_avg()
    fast = extract_regions(image, regions, profiles, parallel=True, workers=2)
    out["timings"]["radnode parallel (2 workers, fast shape)"] = {
        "regions": {k: round(r.seconds, 2) for k, r in fast.regions.items()},
        "total": round(fast.wall_seconds, 2), "load": [load, load_avg()]}
    (folder / "reference.json").write_text(json.dumps(out, default=float), encoding="utf-8")


def speed_profile(profile: Any, filters: bool) -> Any:
    """The profile with the original image only, or with its filters but without radnode's own LBP-3D."""
    from radnode.models.radiomics.extract import Profile

    types = {k: v for k, v in profile.params["imageType"].items() if k != "LBP3D"} if filters else {"Original": {}}
    params = {**profile.params, "imageType": types}
    return Profile(profile.name, profile.version, profile.description, params, profile.fast_shape, profile.min_voxels)


# --- engine side ----------------------------------------------------------------------------------------


def engine_factory(name: str, threads: int = 1) -> tuple[str, Callable[[dict[str, Any]], Any]] | str:
    """(version, params → extractor) for an importable engine, else why it is not usable."""
    distribution, module_name = ENGINES[name]
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return f"distribution {distribution!r} not installed in {sys.executable}"
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the finding
        return f"import {module_name} failed: {type(error).__name__}: {error}"
    if name.startswith("flash-radiomics"):
        h5 = tempfile.mkdtemp(prefix="flash_h5_")
        adapted = name.endswith("+adapted")

        def make(params: dict[str, Any]) -> Any:
            setting = {**params.get("setting", {}), "hdf5OutputDirectory": h5}
            if adapted:
                setting["glcmPythonMCC"] = True
            params = {**params, "setting": setting}
            extractor = module.RadiomicsFeatureExtractor(params, backend="cpu", num_threads=threads)
            return FlashAdapted(extractor) if adapted else extractor

        return version, make
    if name == "fastrad":
        return version, lambda params: FastradAdapter(module, params)
    if hasattr(module, "RadiomicsFeatureExtractor"):
        return version, lambda params: module.RadiomicsFeatureExtractor(params)
    return f"{module_name} has no pyradiomics-style RadiomicsFeatureExtractor (no CPU path found)"


class FlashAdapted:
    """flash-radiomics 1.0.0 with the adaptations found by this comparison.

    (The third, flash's own ``glcmPythonMCC`` setting, is set where the extractor is made:
    its native MCC eigenvalue solver differs from numpy's by up to 3e-4.)

    - Its discretisation cache is keyed by the image buffer's memory address; the buffer
      of one filtered image is freed and the next one often gets the same address, so
      later image types reuse an earlier image's gray levels (every discretised feature of
      the filtered images differs). Clearing the cache before each image type removes all
      of these differences (a private attribute: a workaround, not a fix).
    - ``firstorder_Kurtosis`` is IBSI's excess kurtosis (pyradiomics' value minus 3).
    """

    def __init__(self, extractor: Any) -> None:
        self.extractor = extractor
        compute = extractor.computeFeatures

        def fresh_cache(*args: Any, **kwargs: Any) -> Any:
            extractor._discretization_cache.clear()
            return compute(*args, **kwargs)

        extractor.computeFeatures = fresh_cache

    def execute(self, image: sitk.Image, mask: sitk.Image) -> dict[str, Any]:
        """pyradiomics-convention values."""
        vector = dict(self.extractor.execute(image, mask))
        for key, value in list(vector.items()):
            if key.endswith("_firstorder_Kurtosis"):
                vector[key] = float(value) + 3.0
        return vector


class FastradAdapter:
    """fastrad behind pyradiomics' ``execute(image, mask)``, for the settings fastrad has.

    fastrad (torch) takes a bin width, ``force2D`` and feature classes only: no resampling,
    re-segmentation, normalisation, bin count, GLCM weighting or filters. Parameters that
    need any of these raise ``ValueError`` naming the setting (reported as not supported);
    ``voxelArrayShift`` cannot be set either and only changes the energy features, so it is
    passed over and shows up as a difference there.
    """

    _UNSUPPORTED: ClassVar[dict[str, Any]] = {"resampledPixelSpacing": None, "resegmentRange": None, "normalize": False, "binCount": None,
                    "weightingNorm": None, "correctMask": False}

    def __init__(self, module: Any, params: dict[str, Any]) -> None:
        setting = params.get("setting") or {}
        for key, default in self._UNSUPPORTED.items():
            if setting.get(key, default) not in (default, None) or (key == "normalize" and setting.get(key)):
                raise ValueError(f"fastrad has no setting for {key}={setting[key]!r}")
        if set(params.get("imageType", {"Original": {}})) != {"Original"}:
            raise ValueError(f"fastrad has no image filters (asked for {sorted(params['imageType'])})")
        if list(setting.get("distances", [1])) != [1]:
            raise ValueError(f"fastrad has no GLCM distances other than 1 (asked for {setting['distances']})")
        self.module = module
        self.label = int(setting.get("label", 1))
        self.settings = module.FeatureSettings(
            feature_classes=[c.lower() for c in (params.get("featureClass") or ALL_3D)],
            bin_width=float(setting.get("binWidth", 25.0)), device="cpu",
            force2D=bool(setting.get("force2D", False)), force2Ddimension=int(setting.get("force2Ddimension", 0)))

    def execute(self, image: sitk.Image, mask: sitk.Image) -> dict[str, float]:
        """Features on the mask's bounding box (1 voxel margin), named like pyradiomics' original image."""
        import numpy as np
        import torch

        array = sitk.GetArrayFromImage(image).astype(np.float32)
        region = sitk.GetArrayFromImage(mask) == self.label
        box = tuple(slice(max(0, int(i.min()) - 1), int(i.max()) + 2) for i in np.nonzero(region))
        spacing = tuple(float(v) for v in image.GetSpacing()[::-1])
        extractor = self.module.FeatureExtractor(self.settings)
        values = extractor.extract(self.module.MedicalImage(torch.from_numpy(np.ascontiguousarray(array[box])), spacing),
                                   self.module.Mask(torch.from_numpy(np.ascontiguousarray(region[box])), spacing))
        # fastrad names features "glcm:joint_average", "firstorder:10th_percentile".
        return {"original_" + k.replace(":", "_").replace("th_percentile", "percentile"): float(v)
                for k, v in values.items()}


def run_engine(make: Callable[[dict[str, Any]], Any], params: dict[str, Any], image: sitk.Image,
               mask: sitk.Image) -> tuple[dict[str, float], float]:
    """Feature values (diagnostics dropped) and wall seconds of one extraction."""
    extractor = make(params)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        vector = extractor.execute(image, mask)
    seconds = time.perf_counter() - start
    return {k: float(v) for k, v in vector.items() if not k.startswith("diagnostics_")}, seconds


def baseline_columns(data: Path) -> dict[str, dict[str, Any]]:
    """pyradiomics' own lung1/lung2 baseline: column → settings, diagnostics, class → {feature: value}."""
    columns: dict[str, dict[str, Any]] = defaultdict(lambda: {"settings": None, "classes": {}, "diagnostics": {}})
    for feature_class in CLASSES:
        with (data / "baseline" / f"baseline_{feature_class}.csv").open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        for j, column in enumerate(rows[0][1:], start=1):
            if not column.startswith("lung"):
                continue
            entry, values = columns[column], {}
            for row in rows[1:]:
                if row[0] == "diagnostics_Configuration_Settings":
                    entry["settings"] = {k: v for k, v in ast.literal_eval(row[j]).items() if k != "additionalInfo"}
                elif row[0].startswith("diagnostics_"):
                    entry["diagnostics"][row[0]] = row[j]
                elif row[j].strip():
                    values[row[0]] = float(row[j])
            entry["classes"][feature_class] = values
    return dict(columns)


def shape2d_mask(entry: dict[str, Any], label: sitk.Image) -> sitk.Image:
    """The single slice the ``*_shape2D`` baseline column was computed on."""
    import numpy as np

    index = ast.literal_eval(entry["diagnostics"]["diagnostics_Mask-corrected_CenterOfMassIndex"])
    array = sitk.GetArrayFromImage(label) == 1
    only = np.zeros_like(array)
    only[round(index[2])] = array[round(index[2])]
    mask = sitk.GetImageFromArray(only.astype(np.uint8))
    mask.CopyInformation(label)
    return mask


def normalised(name: str) -> str:
    """Feature name without case and underscores (``original_glcm_joint_average`` = ``original_glcm_JointAverage``)."""
    return name.lower().replace("_", "")


class Agreement:
    """Worst relative difference per feature, missing features, failures."""

    def __init__(self) -> None:
        self.worst: dict[str, tuple[float, str]] = {}
        self.missing: set[str] = set()
        self.errors: list[str] = []
        self.compared = 0

    def add(self, where: str, got: Mapping[str, float], reference: Mapping[str, float]) -> None:
        loose = {normalised(k): v for k, v in got.items()}
        for name, ref in reference.items():
            value = got.get(name, loose.get(normalised(name)))
            if value is None:
                self.missing.add(name)
                continue
            rel = relative(value, float(ref) if ref is not None else math.nan)
            self.compared += 1
            if rel > self.worst.get(name, (-1.0, ""))[0]:
                self.worst[name] = (rel, where)

    def summary(self) -> dict[str, Any]:
        over = sorted(((v[0], k, v[1]) for k, v in self.worst.items() if v[0] > TOLERANCE), reverse=True)
        by_class: dict[str, float] = defaultdict(float)
        for name, (rel, _) in self.worst.items():
            by_class[name.split("_")[1]] = max(by_class[name.split("_")[1]], rel)
        return {"compared": self.compared, "max_rel": max((v[0] for v in self.worst.values()), default=None),
                "max_rel_by_class": dict(by_class), "over_tolerance": [[k, r, w] for r, k, w in over],
                "missing": sorted(self.missing), "errors": self.errors}


def compare_baseline(make: Callable[[dict[str, Any]], Any], data: Path) -> dict[str, Any]:
    """Every lung1/lung2 baseline column with the settings it recorded."""
    result: dict[str, Any] = {}
    columns = baseline_columns(data)
    for case in ("lung1", "lung2"):
        image = sitk.ReadImage(str(data / f"{case}_image.nrrd"))
        label = sitk.ReadImage(str(data / f"{case}_label.nrrd"))
        agreement = Agreement()
        for column, entry in sorted(columns.items()):
            if column.split("_")[0] != case:
                continue
            params = {"setting": entry["settings"], "imageType": {"Original": {}},
                      "featureClass": {c: None for c in entry["classes"]}}
            mask = shape2d_mask(entry, label) if column.endswith("_shape2D") else label
            try:
                got, _ = run_engine(make, params, image, mask)
            except Exception as error:  # noqa: BLE001 - an engine's failure on a column is a finding
                agreement.errors.append(f"{column}: {type(error).__name__}: {error}"[:300])
                continue
            for values in entry["classes"].values():
                agreement.add(column, got, values)
        result[case] = agreement.summary()
    return result


def compare_reference(make: Callable[[dict[str, Any]], Any], reference: dict[str, Any],
                      folder: Path) -> dict[str, Any]:
    """IBSI phantom (config A) agreement, then the three regions: agreement and time."""
    out: dict[str, Any] = {}
    ibsi = shared_data() / "ibsi_ct_phantom" / "nifti"
    agreement = Agreement()
    try:
        got, _ = run_engine(make, {"setting": IBSI_A_SETTINGS, "imageType": {"Original": {}}, "featureClass": ALL_3D},
                            sitk.ReadImage(str(ibsi / "image" / "phantom.nii.gz")),
                            sitk.ReadImage(str(ibsi / "mask" / "mask.nii.gz")))
        agreement.add("ibsi-a", got, reference["ibsi"])
        out["features_all_3d_classes"] = {"engine": len(got), "pyradiomics": len(reference["ibsi"]),
                                          "extra": sorted({normalised(k) for k in got}
                                                          - {normalised(k) for k in reference["ibsi"]})}
    except Exception as error:  # noqa: BLE001
        agreement.errors.append(f"ibsi-a: {type(error).__name__}: {error}"[:300])
    out["ibsi"] = agreement.summary()

    image = sitk.ReadImage(str(folder / "image.nrrd"))
    regions_agreement, timings = Agreement(), {}
    load = load_avg()
    for region, params in reference["region_params"].items():
        try:
            got, seconds = run_engine(make, params, image, sitk.ReadImage(str(folder / f"{region}.nrrd")))
        except Exception as error:  # noqa: BLE001
            regions_agreement.errors.append(f"{region}: {type(error).__name__}: {error}"[:300])
            continue
        timings[region] = round(seconds, 2)
        regions_agreement.add(region, got, reference["regions"][region])
    out["regions"] = regions_agreement.summary()
    out["timing"] = {"regions": timings, "total": round(sum(timings.values()), 2), "load": [load, load_avg()]}
    return out


def print_table(figures: dict[str, Any]) -> None:
    """A plain-text summary table."""
    print(f"\n{'engine':22} {'version':9} {'lung1 max rel':>14} {'lung2 max rel':>14} {'IBSI max rel':>13} "
          f"{'regions max rel':>15} {'tumour s':>9} {'ring s':>7} {'lung s':>7}")
    for name, timing in figures.get("reference_timings", {}).items():
        r = timing["regions"]
        print(f"{name[:22]:22} {'':9} {'(reference)':>14} {'':>14} {'':>13} {'':>15} {r.get('tumour', 0):>9} "
              f"{r.get('ring', 0):>7} {r.get('lung', 0):>7}  load {timing['load']}")
    for name, entry in figures["engines"].items():
        if "unavailable" in entry:
            print(f"{name:22} {'-':9} unavailable: {entry['unavailable']}")
            continue

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2e}"

        r = entry["timing"]["regions"]
        print(f"{name:22} {entry['version']:9} {fmt(entry['lung1']['max_rel']):>14} {fmt(entry['lung2']['max_rel']):>14} "
              f"{fmt(entry['ibsi']['max_rel']):>13} {fmt(entry['regions']['max_rel']):>15} {r.get('tumour', '-'):>9} "
              f"{r.get('ring', '-'):>7} {r.get('lung', '-'):>7}  load {entry['timing']['load']}")
        for where in ("lung1", "lung2", "ibsi", "regions"):
            over = entry[where]["over_tolerance"]
            if over or entry[where]["missing"] or entry[where]["errors"]:
                print(f"    {where}: {len(over)} features > {TOLERANCE:g}; worst: "
                      + ", ".join(f"{k} {r:.2e} ({w})" for k, r, w in over[:6])
                      + (f"; missing {len(entry[where]['missing'])}" if entry[where]["missing"] else "")
                      + (f"; errors {entry[where]['errors'][:2]}" if entry[where]["errors"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, help="reference mode (radnode's venv): write regions and reference here")
    parser.add_argument("--reference", type=Path, help="folder written by --prepare (default: prepare one now)")
    parser.add_argument("--radnode-python", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--filters", action="store_true",
                        help="with --prepare: time the profiles' filtered image types too (LBP-3D excluded)")
    parser.add_argument("--threads", type=int, default=1, help="threads for engines that take a count (flash)")
    parser.add_argument("--sitk-threads", type=int, default=1,
                        help="SimpleITK's global thread count in engine mode (1, like radnode's serial reference)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("radiomics", "flash_radiomics"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    if args.prepare:
        prepare(args.prepare, args.seed, args.filters)
        return 0
    # radnode's reference runs single-threaded (SimpleITK included): so do the engines.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.sitk_threads)
    data = shared_data() / "pyradiomics"
    figures: dict[str, Any] = {"python": sys.executable, "cpu_count": os.cpu_count(), "tolerance": TOLERANCE,
                               "threads": args.threads,
                               "sitk_threads": args.sitk_threads,
                               "engines": {}}
    available = {}
    for name in args.engines.split(","):
        made = engine_factory(name, args.threads)
        if isinstance(made, str):
            figures["engines"][name] = {"unavailable": made}
            print(f"{name}: not usable here ({made})")
        else:
            available[name] = made
    if not available:
        print_table(figures)
        return 0
    folder = args.reference
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="radiomics_engines_"))
        print(f"preparing the pyradiomics 3.0.1 reference with {args.radnode_python} in {folder} ...")
        subprocess.run([args.radnode_python, str(Path(__file__).resolve()), "--prepare", str(folder),
                        "--seed", str(args.seed), *(["--filters"] if args.filters else [])], check=True, cwd=REPO)
    reference = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
    figures["reference"] = {"pyradiomics": reference["pyradiomics"], "case": reference["case"],
                            "voxels": reference["voxels"], "image_types": reference["image_types"]}
    figures["reference_timings"] = reference["timings"]
    for name, (version, make) in available.items():
        print(f"{name} {version}: lung1/lung2 baseline, IBSI phantom, three regions ...")
        entry: dict[str, Any] = {"version": version}
        entry.update(compare_baseline(make, data))
        entry.update(compare_reference(make, reference, folder))
        figures["engines"][name] = entry
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
