"""A synthetic radiogenomic cohort with known answers (no real transcriptome reaches radnode's CI).

Each gene set ``k`` has a latent biological programme ``z_k`` per patient; its genes are
``z_k`` plus gene noise, so masking with the set keeps the programme. Planted effects:

* :data:`PLANTED_FEATURES`: radiomic feature → the gene set whose programme drives it;
* :data:`NULL_FEATURES`: features driven by nothing (a masking rank of them is chance);
* histology (ADC / SCC / other) from :data:`HISTOLOGY_SET`'s programme;
* survival: the hazard rises with :data:`SURVIVAL_FEATURE` (hazard ratio
  ``exp(SURVIVAL_LOG_HR)`` per SD); the other features carry no risk.

The shapes are those of the research commands' inputs (``EXPR.csv``, ``FEAT.csv``,
``CLIN.csv``, GMT), written by :func:`write_cohort`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from radnode.models.research.tables import SAMPLE_ID, GeneSet

#: radiomic feature → index of the gene set that drives it.
PLANTED_FEATURES: dict[str, int] = {
    "tumour_original_glcm_Contrast": 0,
    "tumour_original_glcm_JointEntropy": 1,
    "tumour_original_shape_Sphericity": 2,
}
#: Features with no planted gene association.
NULL_FEATURES: tuple[str, ...] = ("tumour_original_shape_Elongation", "tumour_original_firstorder_Skewness")
#: Feature that drives the hazard (not associated with any gene set).
SURVIVAL_FEATURE = "tumour_original_firstorder_Skewness"
SURVIVAL_LOG_HR = 0.9
#: Gene set whose programme decides histology.
HISTOLOGY_SET = 3


def set_name(k: int) -> str:
    """Name of synthetic gene set ``k`` (GMT-style)."""
    return f"SYNTH_PROGRAMME_{k:02d}"


@dataclass
class Cohort:
    """The tables of one synthetic cohort and what was planted in them."""

    expression: pd.DataFrame
    features: pd.DataFrame
    clinical: pd.DataFrame
    gene_sets: list[GeneSet]
    truth: dict[str, object] = field(default_factory=dict)


def make_cohort(samples: int = 160, gene_sets: int = 8, genes_per_set: int = 12, background_genes: int = 24,
                seed: int = 0, signal: float = 1.0) -> Cohort:
    """Draw a cohort; ``signal`` scales every planted gene→feature effect (0: none)."""
    if gene_sets <= max(max(PLANTED_FEATURES.values()), HISTOLOGY_SET):
        raise ValueError(f"gene_sets must exceed {max(max(PLANTED_FEATURES.values()), HISTOLOGY_SET)}")
    rng = np.random.default_rng(seed)
    ids = [f"SYN{i:04d}" for i in range(samples)]
    z = rng.normal(size=(samples, gene_sets))
    columns: dict[str, np.ndarray] = {}
    sets: list[GeneSet] = []
    for k in range(gene_sets):
        names = [f"G{k:02d}X{j:02d}" for j in range(genes_per_set)]
        for name in names:  # log-expression-like: programme + gene noise around a gene's own level
            columns[name] = 6.0 + rng.normal(0, 1) + 0.9 * z[:, k] + 0.5 * rng.normal(size=samples)
        sets.append(GeneSet(set_name(k), f"synthetic programme {k}", tuple(names)))
    for j in range(background_genes):
        columns[f"BG{j:03d}"] = 6.0 + rng.normal(size=samples)
    expression = pd.DataFrame(columns, index=pd.Index(ids, name=SAMPLE_ID))

    feats: dict[str, np.ndarray] = {}
    for name, k in PLANTED_FEATURES.items():
        feats[name] = 10.0 + 3.0 * (signal * z[:, k] + 0.35 * rng.normal(size=samples))
    for name in NULL_FEATURES:
        feats[name] = 5.0 + 2.0 * rng.normal(size=samples)
    features = pd.DataFrame(feats, index=pd.Index(ids, name=SAMPLE_ID))

    hz = z[:, HISTOLOGY_SET]
    histology = np.where(hz > 0.45, "ADC", np.where(hz < -0.45, "SCC", "other"))
    stage = rng.choice(["I", "II", "III"], size=samples)
    risk = features[SURVIVAL_FEATURE].to_numpy()
    risk = (risk - risk.mean()) / risk.std()
    time = rng.exponential(1.0 / (0.05 * np.exp(SURVIVAL_LOG_HR * risk)))
    censor = rng.uniform(5, 60, size=samples)
    clinical = pd.DataFrame({"time": np.round(np.minimum(time, censor), 3) + 0.001,
                             "event": (time <= censor).astype(int),
                             "histology": histology, "stage": stage,
                             "age": rng.integers(45, 85, size=samples)},
                            index=pd.Index(ids, name=SAMPLE_ID))
    truth = {"planted_features": {f: set_name(k) for f, k in PLANTED_FEATURES.items()},
             "null_features": list(NULL_FEATURES), "histology_set": set_name(HISTOLOGY_SET),
             "survival_feature": SURVIVAL_FEATURE, "survival_log_hr_per_sd": SURVIVAL_LOG_HR,
             "seed": seed, "signal": signal}
    return Cohort(expression, features, clinical, sets, truth)


def write_gmt(sets: list[GeneSet], path: str | os.PathLike[str]) -> None:
    """Write gene sets in MSigDB's GMT format."""
    Path(path).write_text("".join("\t".join([s.name, s.description, *s.genes]) + "\n" for s in sets),
                          encoding="utf-8")


def write_cohort(cohort: Cohort, out: str | os.PathLike[str]) -> dict[str, Path]:
    """``expression.csv``, ``features.csv``, ``clinical.csv``, ``gene_sets.gmt`` and ``truth.json`` in ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"expression": d / "expression.csv", "features": d / "features.csv", "clinical": d / "clinical.csv",
             "gene_sets": d / "gene_sets.gmt", "truth": d / "truth.json"}
    cohort.expression.to_csv(paths["expression"], float_format="%.6g")
    cohort.features.to_csv(paths["features"], float_format="%.6g")
    cohort.clinical.to_csv(paths["clinical"])
    write_gmt(cohort.gene_sets, paths["gene_sets"])
    paths["truth"].write_text(json.dumps(cohort.truth, indent=2) + "\n", encoding="utf-8")
    return paths
