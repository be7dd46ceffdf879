"""``radnode evaluate seg``: Dice, surface Dice, HD95, APL and volumes of contours vs references.

The ``evaluate`` group (:data:`evaluate_app`) can take further commands from other modules
(``evaluate classifier``); :func:`register` adds the group to the application once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from radnode.cli.context import EXIT_USAGE, fail


evaluate_app = typer.Typer(name="evaluate", help="Evaluate model outputs against references.", no_args_is_help=True)


@evaluate_app.command("seg")
def evaluate_seg(
    pred: Annotated[Path, typer.Option("--pred", help="Predictions: NIfTI, DICOM SEG or RTSTRUCT file or folder.")],
    truth: Annotated[Path, typer.Option("--truth", help="References: NIfTI, DICOM SEG or RTSTRUCT file or folder.")],
    ct: Annotated[
        Path | None, typer.Option("--ct", help="CT folder (needed for SEG/RTSTRUCT; CT background of the PNGs).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.csv and the PNGs.")] = Path("evaluation"),
    tolerance_mm: Annotated[float, typer.Option("--tolerance-mm", min=0.0, help="Surface-Dice tolerance (mm).")] = 1.18,
    pred_roi: Annotated[str | None, typer.Option("--pred-roi", help="Segment/ROI name in the predictions.")] = None,
    truth_roi: Annotated[str | None, typer.Option("--truth-roi", help="Segment/ROI name in the references.")] = None,
) -> None:
    """Compare automatic tumour contours with reference contours, case by case."""
    from rich.console import Console
    from rich.table import Table

    from radnode.models.evaluation import METRICS_FILE, EvaluationError, evaluate_cases

    try:
        results = evaluate_cases(pred, truth, out, ct=ct, tolerance_mm=tolerance_mm,
                                 pred_roi=pred_roi, truth_roi=truth_roi)
    except (EvaluationError, ValueError) as exc:
        fail(str(exc), code=EXIT_USAGE)
        return
    table = Table(title=f"segmentation vs reference (surface Dice at {tolerance_mm} mm)")
    for column in ("case", "Dice", "surface Dice", "HD95 mm", "APL mm", "V pred mL", "V truth mL"):
        table.add_column(column, justify="left" if column == "case" else "right")

    def fmt(value: float) -> str:
        return "nan" if math.isnan(value) else f"{value:.3f}"

    for r in results:
        m = r.metrics
        table.add_row(r.case_id, fmt(m.dice), fmt(m.surface_dice), fmt(m.hd95_mm), fmt(m.added_path_length_mm),
                      fmt(m.volume_pred_ml), fmt(m.volume_truth_ml))
    Console().print(table)
    typer.echo(f"metrics: {out / METRICS_FILE}")


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` group (with ``evaluate seg``) to ``app``."""
    app.add_typer(evaluate_app, name="evaluate")
