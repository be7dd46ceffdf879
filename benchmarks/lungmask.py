"""Benchmark: classical lung mask on a 512 × 512 × 150 chest CT (target < 5 s on CPU).

The CT is the real NSCLC-Radiomics case LUNG1-002 from ``../shared/data`` (512 × 512 ×
111 at 0.977 × 0.977 × 3 mm), resampled along z (linear) to 150 slices so the grid is
the size the target names; a synthetic phantom of the same size is timed too. Every
step of :func:`radnode.models.lungmask.segment_lungs` runs single-threaded (numpy /
scipy.ndimage), so the figure is one core's.

Run::

    .venv/bin/python benchmarks/lungmask.py [--repeats 3] [--data ../shared/data]

Prints the median wall time and the per-step breakdown of the median run, plus the
Dice of the phantom's lungs against its truth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import SimpleITK as sitk

from radnode.dicom_io.series import load_series
from radnode.models.lungmask import LungMaskResult, segment_lungs
from radnode.models.metrics import dice

TARGET_SECONDS = 5.0
TARGET_SLICES = 150
REPO_ROOT = Path(__file__).resolve().parents[1]


def resample_slices(image: sitk.Image, slices: int) -> sitk.Image:
    """The same field of view on ``slices`` slices (linear interpolation along z)."""
    size = list(image.GetSize())
    spacing = list(image.GetSpacing())
    extent = (size[2] - 1) * spacing[2]
    spacing[2] = extent / (slices - 1)
    size[2] = slices
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
        image.GetDirection(), -1024, image.GetPixelID(),
    )


def time_runs(image: sitk.Image, repeats: int) -> tuple[float, LungMaskResult, list[float]]:
    """Median wall time, the result of the median run and all times."""
    runs: list[tuple[float, LungMaskResult]] = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = segment_lungs(image)
        runs.append((time.perf_counter() - start, result))
    runs.sort(key=lambda r: r[0])
    seconds, result = runs[len(runs) // 2]
    return seconds, result, [r[0] for r in runs]


def report(name: str, image: sitk.Image, seconds: float, result: LungMaskResult, times: list[float]) -> None:
    size = image.GetSize()
    print(f"\n{name}: {size[0]}x{size[1]}x{size[2]} voxels, spacing "
          f"{tuple(round(s, 3) for s in image.GetSpacing())} mm")
    print(f"  median {seconds:.2f} s over {len(times)} runs (all: "
          f"{', '.join(f'{t:.2f}' for t in times)}); target < {TARGET_SECONDS:.0f} s: "
          f"{'met' if seconds < TARGET_SECONDS else 'NOT met'}")
    print("  breakdown: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    print(f"  right {result.right_volume_ml:.0f} mL, left {result.left_volume_ml:.0f} mL, "
          f"airway {result.airway_volume_ml:.0f} mL, split={result.split}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--no-phantom", action="store_true", help="skip the phantom run")
    args = parser.parse_args(argv)

    ct_dir = args.data / "nsclc_radiomics" / "LUNG1-002" / "CT"
    start = time.perf_counter()
    series = load_series(ct_dir)
    print(f"loaded {ct_dir} in {time.perf_counter() - start:.2f} s")
    image = resample_slices(series.image, TARGET_SLICES)
    seconds, result, times = time_runs(image, args.repeats)
    report("LUNG1-002 resampled", image, seconds, result, times)

    if not args.no_phantom:
        from radnode.phantom import synthesize_volume

        volume = synthesize_volume(7, slices=TARGET_SLICES, tumors=2, matrix=512)
        image = volume.image("hu")
        seconds, result, times = time_runs(image, args.repeats)
        report("phantom seed 7", image, seconds, result, times)
        for label, name in ((1, "right"), (2, "left")):
            score = dice(result.labels == label, volume.lungs == label)
            print(f"  Dice {name} vs phantom truth: {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
