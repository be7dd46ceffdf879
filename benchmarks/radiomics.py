"""Three-region radiomics: serial pyradiomics vs radnode (parallel regions + fast exact shape).

One run, same machine, same profiles (``tumour-v1``, ``ring-v1``, ``lung-v1``):

1. **pyradiomics serial**: the three regions one after the other in this process, with
   pyradiomics' own shape class (quadratic diameter search); this is the reference.
2. **radnode serial**: the same, with the fast exact shape class (isolates that gain).
3. **radnode parallel**: the three regions in worker processes (``--workers``, default 2)
   with the fast shape class: what the chain runs.

It checks that all three give the same values (runs 2 and 3 bit-identical; run 1 equal
up to the mesh area/volume summation order, diameters identical) and reports the ratios.
Then it estimates the *full published profile* (``published-full-v1``, 1 mm) on the whole
lung without running it (pyradiomics needs about 12 minutes there): the whole-lung shape
class at 1 mm is timed with the fast class, the other classes and filters on a slab of
the lung, and scaled by voxel count (they are linear in it).

Input: the deterministic phantom (``radnode.phantom.synthesize_volume``, 512×512×100,
its truth tumour and lungs, 3 mm ring) or, with ``--case lung2``, the real pyradiomics
case (tumour label; its lungs from radnode's classical lung mask).

    .venv/bin/python benchmarks/radiomics.py [--case phantom|lung2] [--workers 2] [--json OUT]

The machine has 2 cores shared with other work: the load average is printed with the
figures, and besides wall times the CPU seconds of every part are reported, with the
makespan of the parallel run's parts on free cores (what the wall time would be without
the other load): compare ratios from one run, not absolute seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

# This file shares its name with the pyradiomics package ("radiomics"); run as a script,
# its folder would be sys.path[0] and shadow that package, so the folder is dropped first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _HERE]

import numpy as np
import SimpleITK as sitk

from radnode.models.radiomics import (
    RadiomicsResult,
    extract_region,
    extract_regions,
    load_profile,
)
from radnode.models.radiomics.extract import Profile
from radnode.models.regions import build_regions

REPO = Path(__file__).resolve().parents[1]
PROFILES = {"tumour": "tumour-v1", "ring": "ring-v1", "lung": "lung-v1"}
ISSUE_TARGET_RATIO = 1.8
ISSUE_TARGET_SECONDS = 60.0


def _shared_data() -> Path:
    override = os.environ.get("RADNODE_SHARED_DATA")
    return Path(override) if override else REPO.parent / "shared" / "data"


def load_case(case: str, seed: int) -> tuple[sitk.Image, dict[str, np.ndarray], str]:
    """The CT and its three regions."""
    if case == "phantom":
        from radnode.phantom import synthesize_volume

        volume = synthesize_volume(seed=seed, slices=100, tumors=1)
        image = volume.image("hu")
        tumour, lung = volume.tumors > 0, volume.lungs > 0
        label = f"phantom seed {seed}"
    elif case == "lung2":
        from radnode.models.lungmask import segment_lungs

        folder = _shared_data() / "pyradiomics"
        image = sitk.ReadImage(str(folder / "lung2_image.nrrd"))
        tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "lung2_label.nrrd"))) == 1
        lung = segment_lungs(image).lungs > 0
        label = "pyradiomics lung2"
    else:
        raise ValueError(f"--case must be phantom or lung2, got {case!r}")
    regions = build_regions(tumour, lung, image.GetSpacing()[::-1])
    return image, regions.masks(), f"{label}, {'x'.join(map(str, image.GetSize()))}"


def _without_fast_shape(name: str) -> Profile:
    profile = load_profile(name)
    return Profile(profile.name, profile.version, profile.description, profile.params, False, profile.min_voxels)


def _class_of(feature: str) -> str:
    parts = feature.split("_")
    return parts[1] if parts[0] == "original" else f"{parts[0].split('-')[0]}:{parts[1]}"


def compare(a: RadiomicsResult, b: RadiomicsResult) -> dict[str, Any]:
    """Largest relative difference per feature class, and whether all values are bit-identical."""
    worst: dict[str, float] = defaultdict(float)
    identical = True
    for name, ra in a.regions.items():
        rb = b.regions[name]
        if list(ra.features) != list(rb.features):
            return {"identical": False, "error": f"feature names differ in {name}"}
        for key, va in ra.features.items():
            vb = rb.features[key]
            same = np.float64(va).tobytes() == np.float64(vb).tobytes()
            identical &= same
            if not same:
                rel = abs(va - vb) / abs(vb) if vb != 0 else abs(va)
                worst[_class_of(key)] = max(worst[_class_of(key)], rel if math.isfinite(rel) else math.inf)
    return {"identical": identical, "max_rel_by_class": dict(worst)}


def cpu_figures(run: RadiomicsResult, workers: int) -> dict[str, float]:
    """CPU seconds of the work, and the makespan of its parts on ``workers`` free cores.

    CPU time is what the extraction itself needs; wall time on a shared machine also
    contains the time other processes held the cores. The makespan deals the parts
    (largest first) to the least-loaded core: the wall time the same work would take with
    the cores to itself, pool start-up not included.
    """
    parts = sorted((c for r in run.regions.values() for c in r.cpu_seconds), reverse=True)
    loads = [0.0] * max(1, workers)
    for c in parts:
        loads[loads.index(min(loads))] += c
    return {"cpu_seconds": round(sum(parts), 1), "makespan_free_cores": round(max(loads), 1)}


def estimate_full_profile_on_lung(image: sitk.Image, lung: np.ndarray, slab_fraction: float) -> dict[str, Any]:
    """published-full-v1 on the whole lung: shape timed whole, the rest timed on a slab and scaled."""
    full = load_profile("published-full-v1")
    shape_only = Profile("est-shape", 1, "shape only", {**full.params, "imageType": {"Original": {}},
                                                          "featureClass": {"shape": None}})
    start = time.perf_counter()
    shape = extract_region(image, lung, shape_only, region="lung")
    shape_seconds = time.perf_counter() - start
    rest_params = {**full.params, "featureClass": {k: v for k, v in full.params["featureClass"].items() if k != "shape"}}
    rest = Profile("est-rest", 1, "no shape", rest_params)
    z = np.nonzero(lung.any(axis=(1, 2)))[0]
    centre, half = (z[0] + z[-1]) // 2, max(1, round(len(z) * slab_fraction / 2))
    slab = np.zeros_like(lung)
    slab[centre - half : centre + half] = lung[centre - half : centre + half]
    start = time.perf_counter()
    part = extract_region(image, slab, rest, region="lung-slab")
    slab_seconds = time.perf_counter() - start
    scale = float(lung.sum()) / float(slab.sum())
    return {
        "shape_seconds_whole_lung_1mm": round(shape_seconds, 1),
        "shape_features": len(shape.features),
        "slab_voxels": int(slab.sum()),
        "lung_voxels": int(lung.sum()),
        "slab_seconds_without_shape": round(slab_seconds, 1),
        "slab_features": len(part.features),
        "estimated_total_seconds": round(shape_seconds + slab_seconds * scale, 0),
        "status": [shape.status, part.status],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="phantom", choices=("phantom", "lung2"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slab-fraction", type=float, default=0.1, help="lung slab for the full-profile estimate")
    parser.add_argument("--no-estimate", action="store_true", help="skip the full-profile estimate")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    image, masks, label = load_case(args.case, args.seed)
    print(f"case: {label}; regions (voxels): " + ", ".join(f"{k} {int(v.sum())}" for k, v in masks.items()))

    reference = extract_regions(image, masks, {k: _without_fast_shape(v) for k, v in PROFILES.items()}, parallel=False)
    serial = extract_regions(image, masks, PROFILES, parallel=False)
    parallel = extract_regions(image, masks, PROFILES, parallel=True, workers=args.workers)
    load_after = os.getloadavg()

    figures: dict[str, Any] = {
        "case": label,
        "cpu_count": os.cpu_count(),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "profiles": PROFILES,
        "features": {k: len(r.features) for k, r in parallel.regions.items()},
        "runs": {},
    }
    for name, run in (("pyradiomics_serial", reference), ("radnode_serial_fast_shape", serial),
                      ("radnode_parallel_fast_shape", parallel)):
        figures["runs"][name] = {
            "wall_seconds": round(run.wall_seconds, 1),
            "regions": {k: round(r.seconds, 1) for k, r in run.regions.items()},
            "status": {k: r.status for k, r in run.regions.items()},
            "parts": {k: r.parts for k, r in run.regions.items()},
            **cpu_figures(run, args.workers if run.mode == "parallel" else 1),
        }
    figures["ratio_pyradiomics_serial_over_radnode_parallel"] = round(reference.wall_seconds / parallel.wall_seconds, 2)
    figures["ratio_pyradiomics_serial_over_radnode_serial"] = round(reference.wall_seconds / serial.wall_seconds, 2)
    figures["ratio_radnode_serial_over_parallel"] = round(serial.wall_seconds / parallel.wall_seconds, 2)
    ref_cpu = figures["runs"]["pyradiomics_serial"]["cpu_seconds"]
    free = figures["runs"]["radnode_parallel_fast_shape"]["makespan_free_cores"]
    figures["ratio_on_free_cores_projected_from_cpu"] = round(ref_cpu / free, 2) if free else None
    figures["radnode_parallel_vs_serial"] = compare(parallel, serial)
    figures["radnode_vs_pyradiomics"] = compare(parallel, reference)
    figures["targets"] = {
        "ratio_at_least": ISSUE_TARGET_RATIO,
        "ratio_met": figures["ratio_pyradiomics_serial_over_radnode_parallel"] >= ISSUE_TARGET_RATIO,
        "seconds_at_most": ISSUE_TARGET_SECONDS,
        "seconds_met": parallel.wall_seconds <= ISSUE_TARGET_SECONDS,
    }
    if not args.no_estimate:
        figures["published_full_on_whole_lung"] = estimate_full_profile_on_lung(image, masks["lung"], args.slab_fraction)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
