"""``radnode train seg``: train RA-Seg on MSD / nnU-Net NIfTI or DICOM CT + RTSTRUCT data.

The ``train`` group (:data:`train_app`) is a Typer object of its own so that other
modules can add commands to it (``train classifier``); :func:`register` adds the group
to the application once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from radnode.cli.context import EXIT_FAILED, EXIT_USAGE, fail


train_app = typer.Typer(name="train", help="Train models on your own data.", no_args_is_help=True)


@train_app.command("seg")
def train_seg(
    data: Annotated[Path, typer.Option("--data", help="MSD/nnU-Net folder (imagesTr/, labelsTr/) or DICOM case folders.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle to write (a folder, or a path ending in .zip).")],
    roi: Annotated[str | None, typer.Option("--roi", help="Tumour ROI name in the RTSTRUCTs (DICOM data).")] = None,
    folds: Annotated[int, typer.Option("--folds", min=1, help="Cross-validation folds (1: none).")] = 5,
    fold: Annotated[str, typer.Option("--fold", help="Fold to train (0-based) or 'all'.")] = "all",
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimiser steps per model.")] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Passes over the training cases (instead of --steps).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Patches per step.")] = 2,
    learning_rate: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-4,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")] = 100,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoints in OUT.work/.")] = False,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the split, sampling and augmentation.")] = 0,
    width: Annotated[str, typer.Option("--width", help="small (16-32-64-128) or faithful (64-128-256-512).")] = "faithful",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="torch CPU threads (default: the usable cores).")
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Bundle name.")] = "raseg-trained",
    negative_fraction: Annotated[float, typer.Option(
        "--negative-fraction", min=0.0, max=0.95,
        help="Share of patches around detector boxes without tumour (hard negatives).")] = 0.0,
    init: Annotated[Path | None, typer.Option(
        "--init", help="Fine-tune from this bundle's weights ('demo': the bundled demo model); same width.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at OUT.")] = False,
) -> None:
    """Train RA-Seg (Dice + cross-entropy, Adam, the method's augmentations) and write a bundle."""
    from radnode.models.bundle import BundleError
    from radnode.models.training.data import (
        TrainingDataError,
        discover_cases,
        load_case,
    )
    from radnode.models.training.loop import (
        TrainConfig,
        TrainingError,
        architecture_for,
        train_and_bundle,
    )

    if steps is not None and epochs is not None:
        fail("give --steps or --epochs, not both", code=EXIT_USAGE)
    if fold != "all" and not fold.isdigit():
        fail(f"--fold: a fold number 0..{folds - 1} or 'all', got {fold!r}", code=EXIT_USAGE)
    if out.exists() and not overwrite and not resume:
        fail(f"{out}: already exists (--overwrite to replace it)", code=EXIT_USAGE)
    initial_state = None
    try:
        arch = architecture_for(width)
        if init is not None:
            initial_state = _initial_state(init, arch)
    except (BundleError, TrainingError) as exc:
        fail(str(exc), code=EXIT_USAGE)
        return
    try:
        sources = discover_cases(data, roi)
        typer.echo(f"{len(sources)} cases in {data} ({sources[0].layout}); preparing (lung mask, 1 x 1 x 1.5 mm grid)")
        cases = [load_case(source, negatives=negative_fraction > 0) for source in sources]
        n_train = len(cases) if folds == 1 else len(cases) - len(cases) // folds
        if steps is not None:
            total = steps
        elif epochs is not None:  # an epoch: as many patches as training cases
            total = epochs * -(-n_train // batch_size)
        else:
            total = TrainConfig().steps
        config = TrainConfig(
            steps=total, batch_size=batch_size, learning_rate=learning_rate,
            checkpoint_every=checkpoint_every, seed=seed, device=device, num_threads=threads,
            negative_fraction=negative_fraction,
        )
        report = train_and_bundle(
            cases, out, arch, config, folds=folds, fold=None if fold == "all" else int(fold),
            resume=resume, progress=True, name=name,
            data_description=f"{data.name} ({sources[0].layout}{', ROI ' + roi if roi else ''})",
            overwrite=overwrite or resume, initial_state=initial_state,
        )
    except (TrainingDataError, TrainingError, BundleError, ValueError) as exc:
        fail(str(exc), code=EXIT_USAGE)
        return
    except RuntimeError as exc:
        fail(str(exc), code=EXIT_FAILED)
        return
    for result in report.folds:
        dice = result.validation_dice
        typer.echo(f"{result.name}: {result.step} steps, validation Dice {dice:.3f}" if dice is not None
                   else f"{result.name}: {result.step} steps")
    mean = report.metrics.get("validation_dice_mean")
    if mean is not None:
        typer.echo(f"cross-validation Dice (mean over cases): {mean:.3f}")
    typer.echo(f"bundle written: {report.bundle} (model {report.final.name}, {report.final.step} steps)")


def _initial_state(init: Path, arch: Any) -> dict[str, Any]:
    """Weights of the bundle ``init`` ('demo': the bundled one), checked against ``arch``."""
    from radnode.models.bundle import BundleError, load_bundle
    from radnode.models.tumour import resolve_bundle

    start = load_bundle(resolve_bundle(str(init)) or init)
    if start.model.config != arch:
        raise BundleError(f"--init {init}: its architecture (channels {start.model.config.channels}) differs "
                          f"from the one to train (channels {arch.channels}); pick the matching --width")
    return start.model.state_dict()


def register(app: typer.Typer) -> None:
    """Add the ``train`` group (with ``train seg``) to ``app``."""
    app.add_typer(train_app, name="train")
