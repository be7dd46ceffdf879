"""PNG figures of the research commands (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def masking_heatmap(masking: pd.DataFrame, path: str | os.PathLike[str], top: int = 20, title: str = "") -> None:
    """Test AUC of the ``top`` gene sets (by mean AUC over targets) × targets, like the paper's Fig. 3/5."""
    plt = _plt()
    table = masking.pivot_table(index="gene_set", columns="target", values="auc")
    order = table.mean(axis=1).sort_values(ascending=False).index[:top]
    table = table.loc[order]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * table.shape[1] + 4), max(3, 0.35 * table.shape[0] + 2)))
    im = ax.imshow(table.to_numpy(), cmap="plasma", vmin=0.3, vmax=1.0, aspect="auto")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index], fontsize=8)
    for (i, j), v in np.ndenumerate(table.to_numpy()):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.7 else "black")
    fig.colorbar(im, ax=ax, label="test AUC (gene set only)")
    ax.set_title(title or "Gene masking: test AUC per gene set and target", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def km_plot(km: dict[str, dict[str, Any]], summary: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Kaplan-Meier curves of the risk groups, training and test panels, log-rank p in the titles."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, part in zip(axes, ("train", "test")):
        for group, color in (("low risk", "tab:blue"), ("high risk", "tab:red")):
            fitter = km.get(part, {}).get(group)
            if fitter is not None:
                fitter.plot_survival_function(ax=ax, ci_show=True, color=color)
        p = summary.get("logrank_p" if part == "test" else "logrank_p_train")
        c = summary.get(f"c_index_{part}")
        ax.set_title(f"{part}: C-index {c:.3f}, log-rank p = {p:.3g}" if p is not None else part, fontsize=9)
        ax.set_xlabel("time")
    axes[0].set_ylabel("survival probability")
    fig.suptitle(f"{summary.get('method')} {summary.get('version')}: risk groups split at training quantile "
                 f"{summary.get('risk_quantile', 0.5):g} of the score ({summary.get('note')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def batch_pca(before: np.ndarray, after: np.ndarray, batches: Sequence[str], path: str | os.PathLike[str],
              title: str = "") -> dict[str, float]:
    """Two PCA scatter plots (before / after ComBat) coloured by batch; returns the batch silhouette of each.

    Both are projected on the principal axes of the z-scored *before* values, so the panels
    share coordinates; the silhouette (by batch, in that space) measures batch separation.
    """
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    plt = _plt()
    mean, sd = before.mean(axis=0), before.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    pca = PCA(n_components=2).fit((before - mean) / sd)
    labels = np.array([str(b) for b in batches])
    scores: dict[str, float] = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    for ax, name, values in zip(axes, ("before", "after"), (before, after)):
        xy = pca.transform((values - mean) / sd)
        scores[name] = float(silhouette_score(xy, labels)) if len(set(labels)) > 1 else float("nan")
        for b in sorted(set(labels)):
            sel = labels == b
            ax.scatter(xy[sel, 0], xy[sel, 1], s=12, alpha=0.7, label=f"{b} (n={int(sel.sum())})")
        ax.set_title(f"{name} ComBat: batch silhouette {scores[name]:.2f}", fontsize=9)
        ax.set_xlabel("PC1")
    axes[0].set_ylabel("PC2")
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return scores
