"""Benchmark: lung mask + RA-Seg tumour segmentation of a 512 × 512 × 150 CT (issue 7 targets).

Targets on this 2-core CPU: ≤ 30 s in total, peak RSS ≤ 4 GB; on a GPU ≤ 3 s.

The CT is a synthetic phantom (``radnode.phantom``, seed 7, one solid tumour) written as
a DICOM series, so "load" is the real DICOM reader. Each configuration runs in a fresh
child process, so its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own:

* ``faithful``: the published network, channels 64-128-256-512, window 64 × 96 × 96,
  overlap 0.25;
* ``fast``: channels 32-64-128-256 and one bigger window 64 × 128 × 128 (overlap 0.25),
  fewer, larger windows over the tumour box;
* ``demo``: the shipped default, the bundled DEMO model (channels 16-32-64-128) with the
  inference settings stored in its bundle (the detector's best six boxes, a coarse second
  pass over boxes of 50 mm or more);
* ``demo-no-coarse``: the same without the coarse pass, to show what it costs.

``faithful`` and ``fast`` use untrained weights (seed 0): timing does not depend on the
weights, only the box found by the classical detector decides how much the network has to
cover, and that box is the same for both. Steps: load (DICOM -> HU image), lung mask, preprocess (clip,
resample, crop), detect (candidate box), network (sliding window), post-process
(components, holes, mapping back to the CT grid), deep features (one extra forward pass),
quality (the contour quality score of radnode.models.quality: two test-time augmentation
passes over the contour's neighbourhood, as the chain runs it).

Run::

    .venv/bin/python benchmarks/segment.py [--device auto|cpu|cuda] [--configs faithful fast]

On a machine without CUDA the GPU figure is reported as not measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_CPU_S = 30.0
TARGET_GPU_S = 3.0
TARGET_RSS_GB = 4.0
SLICES = 150
CONFIGS: dict[str, dict[str, object]] = {
    "faithful": {"channels": (64, 128, 256, 512), "roi_size": (64, 96, 96), "overlap": 0.25},
    "fast": {"channels": (32, 64, 128, 256), "roi_size": (64, 128, 128), "overlap": 0.25},
    # The shipped default: the bundled DEMO model with its own inference settings
    # (channels 16-32-64-128, the detector's best 6 boxes, the coarse pass over large ones).
    "demo": {"bundle": "demo"},
    # The same weights without the coarse pass (raseg-demo 1.1.1's inference): its cost.
    "demo-no-coarse": {"bundle": "demo", "overrides": {"coarse_factor": None}},
}
STEPS = ("load", "lung mask", "preprocess", "detect", "network", "post-process", "features", "quality")


def make_phantom(folder: Path) -> Path:
    """Write the 512 × 512 × 150 phantom series; returns its CT folder."""
    from radnode.phantom import generate_phantom

    result = generate_phantom(folder, seed=7, slices=SLICES, tumors=1, tumor_types=("solid",),
                              tumor_diameter_mm=(25, 35))
    return result.ct_dir


def run_config(name: str, ct_dir: Path, device: str) -> dict[str, object]:
    """Time one configuration in this process (the child's job)."""
    import torch

    from radnode.dicom_io.series import load_series
    from radnode.models.inference import InferenceSettings, resolve_device, segment_ct
    from radnode.models.lungmask import segment_lungs
    from radnode.models.raseg import RASeg, RASegConfig

    spec = CONFIGS[name]
    times: dict[str, float] = {}
    start = time.perf_counter()
    series = load_series(ct_dir)
    times["load"] = time.perf_counter() - start
    start = time.perf_counter()
    lungs = segment_lungs(series.image).lungs
    times["lung mask"] = time.perf_counter() - start
    torch.manual_seed(0)
    dev = resolve_device(device)
    if "bundle" in spec:
        from radnode.models.bundle import load_bundle
        from radnode.models.tumour import resolve_bundle

        bundle = load_bundle(resolve_bundle(str(spec["bundle"])), device=dev)  # type: ignore[arg-type]
        model = bundle.model
        settings = bundle.inference_settings(device=dev.type, **spec.get("overrides", {}))  # type: ignore[arg-type]
    else:
        model = RASeg(RASegConfig(channels=spec["channels"])).to(dev)  # type: ignore[arg-type]
        settings = InferenceSettings(roi_size=spec["roi_size"], overlap=spec["overlap"], device=dev.type)  # type: ignore[arg-type]
    if dev.type == "cuda":  # warm-up: CUDA context and cuDNN autotuning are start-up costs
        segment_ct(model, series.image, lungs.astype("uint8"), settings=settings)
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = segment_ct(model, series.image, lungs.astype("uint8"), settings=settings)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    segment_s = time.perf_counter() - start
    from radnode.models.quality import assess_contour, calibration_for

    assert result.case is not None
    quality = assess_contour(model, result.case, result.grid, settings, calibration_for(name, "benchmark"))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    segment_s += quality.seconds
    times["quality"] = quality.seconds
    grid = result.grid.timings
    times["preprocess"] = grid.get("preprocess", 0.0)
    times["detect"] = grid.get("detect", 0.0)
    times["network"] = grid.get("network", 0.0)
    times["post-process"] = grid.get("postprocess", 0.0) + grid.get("inverse", 0.0)
    times["features"] = grid.get("features", 0.0)
    region = result.grid.region.shape
    return {
        "config": name,
        "device": dev.type,
        "threads": torch.get_num_threads(),
        "times": times,
        "segment_s": segment_s,
        "total_s": times["load"] + times["lung mask"] + segment_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "network_region_zyx": list(region),
        "box_found": result.grid.box is not None,
        "ct_shape_zyx": list(result.mask.shape),
        "quality_score": quality.score,
    }


def print_report(results: list[dict[str, object]], cuda: bool) -> None:
    """The breakdown table and the targets."""
    names = [str(r["config"]) for r in results]
    w = max(12, *(len(n) + 2 for n in names))
    print(f"\n{'step (s)':<16}" + "".join(f"{n:>{w}}" for n in names))
    for step in STEPS:
        print(f"{step:<16}" + "".join(f"{r['times'][step]:>{w}.2f}" for r in results))  # type: ignore[index]
    print(f"{'total':<16}" + "".join(f"{r['total_s']:>{w}.2f}" for r in results))
    print(f"{'peak RSS (GB)':<16}" + "".join(f"{r['peak_rss_gb']:>{w}.2f}" for r in results))
    for r in results:
        target = TARGET_GPU_S if r["device"] == "cuda" else TARGET_CPU_S
        ok = r["total_s"] <= target and r["peak_rss_gb"] <= TARGET_RSS_GB  # type: ignore[operator]
        print(f"{r['config']}: {r['device']} ({r['threads']} threads), network over {r['network_region_zyx']} "
              f"voxels (box found: {r['box_found']}); target ≤ {target:.0f} s and ≤ {TARGET_RSS_GB:.0f} GB: "
              f"{'met' if ok else 'NOT met'}")
    if not cuda:
        print(f"GPU (target ≤ {TARGET_GPU_S:.0f} s): not measured (no CUDA device on this machine)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ct", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_config(args.child, args.ct, args.device)))
        return 0
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    with tempfile.TemporaryDirectory(prefix="radnode-bench-") as tmp:
        start = time.perf_counter()
        ct_dir = make_phantom(Path(tmp))
        print(f"phantom 512 x 512 x {SLICES} written in {time.perf_counter() - start:.1f} s (not timed below)")
        results = []
        for name in args.configs:
            child = subprocess.run(
                [sys.executable, __file__, "--child", name, "--ct", str(ct_dir), "--device", args.device],
                check=True, capture_output=True, text=True,
            )
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print_report(results, cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
