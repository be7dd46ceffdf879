"""``radnode phantom --out DIR --seed N``: write a synthetic chest CT series with ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from radnode.cli.context import EXIT_FAILED, EXIT_USAGE, fail


def register(app: typer.Typer) -> None:
    """Add the ``phantom`` command."""

    @app.command("phantom")
    def phantom(
        out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (ct/ and truth/ are created in it).")],
        seed: Annotated[int, typer.Option("--seed", help="Seed; the same options give identical files.", min=0)],
        slices: Annotated[int, typer.Option("--slices", help="Number of axial slices.")] = 100,
        tumors: Annotated[int, typer.Option("--tumors", help="Number of tumours (0..20).")] = 1,
        matrix: Annotated[int, typer.Option("--matrix", help="Rows and columns per slice.")] = 512,
        pixel_spacing: Annotated[
            float | None,
            typer.Option("--pixel-spacing", help="In-plane spacing in mm (default: 360 mm / matrix)."),
        ] = None,
        slice_thickness: Annotated[
            float, typer.Option("--slice-thickness", help="Slice thickness = slice spacing, mm.")
        ] = 2.5,
        mutation: Annotated[
            str, typer.Option("--mutation", help="Planted mutation label: 0, 1, random, or a probability.")
        ] = "random",
        mutation_effect: Annotated[
            float, typer.Option("--mutation-effect", help="Strength 0..1 of the mutant tumour changes.")
        ] = 1.0,
        tumor_type: Annotated[
            list[str] | None,
            typer.Option(
                "--tumor-type",
                help="solid, part_solid, ground_glass, juxtapleural or spiculated; once for all "
                "tumours or once per tumour (default: random).",
            ),
        ] = None,
        min_diameter: Annotated[float, typer.Option("--min-diameter", help="Smallest tumour diameter, mm.")] = 10.0,
        max_diameter: Annotated[float, typer.Option("--max-diameter", help="Largest tumour diameter, mm.")] = 35.0,
        noise: Annotated[
            float | None,
            typer.Option("--noise", help="Noise std in HU inside the patient (default: scaled to the voxel size)."),
        ] = None,
        patient_id: Annotated[
            str | None, typer.Option("--patient-id", help="Patient ID (default: PHANTOM-<seed>).")
        ] = None,
        patient_name: Annotated[
            str | None, typer.Option("--patient-name", help="Patient name (default: PHANTOM^<seed>).")
        ] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a phantom already in --out.")] = False,
    ) -> None:
        """Write a synthetic chest CT series (DIR/ct) and its ground truth (DIR/truth)."""
        from radnode.phantom import generate_phantom

        options = dict(
            matrix=matrix,
            pixel_spacing=pixel_spacing,
            slice_thickness=slice_thickness,
            mutation=mutation,
            mutation_effect=mutation_effect,
            tumor_types=tuple(tumor_type) if tumor_type else None,
            tumor_diameter_mm=(min_diameter, max_diameter),
            noise_hu=noise,
            patient_id=patient_id,
            patient_name=patient_name,
        )
        try:
            result = generate_phantom(out, seed, slices, tumors, overwrite=overwrite, **options)
        except (ValueError, FileExistsError) as exc:
            fail(str(exc), code=EXIT_USAGE)
            return
        except RuntimeError as exc:
            fail(str(exc), code=EXIT_FAILED)
            return
        labels = result.labels
        typer.echo(f"series {result.series_instance_uid}: {len(result.ct_files)} slices in {result.ct_dir}")
        typer.echo(f"truth: {result.tumor_path}, {result.lungs_path}, {result.labels_path}")
        typer.echo(f"mutation label {labels['mutation']['label']} (effect {labels['mutation']['applied_effect']})")
        for tumor in labels["tumors"]:
            centre = ", ".join(f"{v:.1f}" for v in tumor["centre_mm"])
            typer.echo(
                f"tumour {tumor['index']}: {tumor['type']}, {tumor['volume_ml']:.2f} mL, "
                f"{tumor['lung']} lung, centre ({centre}) mm"
            )
