"""Regenerate ``combat_reference.npz``: neuroCombat's output on a small synthetic table.

Run once (``python tests/data/make_combat_reference.py``) with neuroCombat installed; the
test compares radnode's own ComBat with the stored arrays to 1e-6, so the reference stays
fixed even if a later neuroCombat release changes. Continuous covariates are integers
because neuroCombat casts them to float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from neuroCombat import neuroCombat


def planted(seed: int = 19) -> dict[str, np.ndarray]:
    """3 scanners with additive and multiplicative effects, a sex and an age effect; 8 new cases."""
    rng = np.random.default_rng(seed)
    sizes = {"scannerA": 14, "scannerB": 12, "scannerC": 10}
    batches = np.concatenate([[b] * n for b, n in sizes.items()])
    n, p = len(batches), 6
    sex = rng.integers(0, 2, n)
    age = rng.integers(40, 85, n)
    shift = {"scannerA": 0.0, "scannerB": 1.5, "scannerC": -1.0}
    scale = {"scannerA": 1.0, "scannerB": 2.0, "scannerC": 0.6}
    values = np.empty((n, p))
    for i, b in enumerate(batches):
        centre = 5.0 + 0.8 * sex[i] + 0.03 * age[i]
        values[i] = centre + scale[b] * rng.normal(0, 1, p) + shift[b]
    new_batches = np.array(["scannerA", "scannerB", "scannerC", "scannerB", "scannerA", "scannerC", "scannerB",
                            "scannerA"])
    new_values = np.array([5.0 + scale[b] * rng.normal(0, 1, p) + shift[b] for b in new_batches])
    return {"values": values, "batches": batches, "sex": sex, "age": age, "new_values": new_values,
            "new_batches": new_batches}


def from_training(values: np.ndarray, batches: np.ndarray, estimates: dict) -> np.ndarray:
    """neuroCombatFromTraining's arithmetic on neuroCombat's estimates (cases x features).

    neuroCombat 0.2.12's own function fails under numpy 2 (``int()`` of a 1-element array
    while looking up batch indices); these are its lines with that lookup fixed.
    """
    levels = [str(b) for b in estimates["batches"]]
    wh = [levels.index(str(b)) for b in batches]
    var_pooled = estimates["var.pooled"]  # (features, 1)
    stand_mean = estimates["stand.mean"][:, 0] + estimates["mod.mean"].mean(axis=1)
    dat = values.T
    z = (dat - stand_mean[:, None]) / np.sqrt(var_pooled)
    z = (z - estimates["gamma.star"][wh, :].T) / np.sqrt(estimates["delta.star"][wh, :].T)
    return (z * np.sqrt(var_pooled) + stand_mean[:, None]).T


def main() -> None:
    data = planted()
    covars = pd.DataFrame({"batch": data["batches"], "sex": data["sex"].astype(str), "age": data["age"]})
    with_cov = neuroCombat(data["values"].T.copy(), covars, "batch", categorical_cols=["sex"],
                           continuous_cols=["age"])["data"].T
    plain = neuroCombat(data["values"].T.copy(), covars[["batch"]], "batch")
    no_eb = neuroCombat(data["values"].T.copy(), covars[["batch"]], "batch", eb=False)["data"].T
    applied = from_training(data["new_values"], data["new_batches"], plain["estimates"])
    np.savez_compressed(Path(__file__).with_name("combat_reference.npz"), **data,
                        neurocombat_with_covariates=with_cov, neurocombat_plain=plain["data"].T,
                        neurocombat_no_eb=no_eb, neurocombat_from_training=applied)


if __name__ == "__main__":
    main()
