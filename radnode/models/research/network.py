"""The radiogenomic dense network of Smedley et al. (J Med Imaging 2020, ``papers/003``), in torch.

Transcriptome in, radiomic classes out: 3 or 4 hidden layers, the first of 2000/4000/6000
nodes and each next one half as wide, each ``Linear → BatchNorm → ReLU|sigmoid → Dropout``;
binary cross-entropy over one or several binarised features (multi-label, one radiomic
group at a time) or categorical cross-entropy (histology, stage); Nadam or Adadelta;
mini-batches of 10; early stopping on the loss of a validation part of the training rows
(patience), keeping the best weights.

Gene standardisation is part of the fitted model (:class:`Standardiser`): it is fitted on
the rows a model is trained on and nothing else, so cross-validation never sees the held-out
fold's mean or spread. :meth:`TrainedNetwork.predict` takes an optional gene mask: genes
outside it are set to zero *after* standardisation, i.e. to the training mean (gene masking).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Kind = Literal["binary", "categorical"]

#: The paper's grid (Table 2): 3 x 2 x 2 x 2 x 2 = 48 networks.
PAPER_GRID: dict[str, tuple] = {
    "first_layer": (2000, 4000, 6000),
    "layers": (3, 4),
    "activation": ("relu", "sigmoid"),
    "dropout": (0.4, 0.6),
    "optimizer": ("nadam", "adadelta"),
}


@dataclass(frozen=True)
class NetParams:
    """One point of the hyper-parameter grid."""

    first_layer: int
    layers: int
    activation: Literal["relu", "sigmoid"]
    dropout: float
    optimizer: Literal["nadam", "adadelta"]

    def hidden(self) -> list[int]:
        """Hidden widths: the first layer, halved at each next layer."""
        return [max(1, self.first_layer >> i) for i in range(self.layers)]

    def label(self) -> str:
        """Compact text for tables: ``2000-1000-500/relu/d0.4/nadam``."""
        return f"{'-'.join(map(str, self.hidden()))}/{self.activation}/d{self.dropout:g}/{self.optimizer}"

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "hidden": "-".join(map(str, self.hidden()))}


def grid(first_layer: Sequence[int] = PAPER_GRID["first_layer"], layers: Sequence[int] = PAPER_GRID["layers"],
         activation: Sequence[str] = PAPER_GRID["activation"], dropout: Sequence[float] = PAPER_GRID["dropout"],
         optimizer: Sequence[str] = PAPER_GRID["optimizer"]) -> list[NetParams]:
    """Every combination of the given values (the paper's 48 by default)."""
    for a in activation:
        if a not in ("relu", "sigmoid"):
            raise ValueError(f"activation must be relu or sigmoid, got {a!r}")
    for o in optimizer:
        if o not in ("nadam", "adadelta"):
            raise ValueError(f"optimizer must be nadam or adadelta, got {o!r}")
    for d in dropout:
        if not 0 <= d < 1:
            raise ValueError(f"dropout must be in [0, 1), got {d}")
    for n in layers:
        if n < 1:
            raise ValueError(f"layers must be at least 1, got {n}")
    return [NetParams(int(f), int(n), a, float(d), o)  # type: ignore[arg-type]
            for f, n, a, d, o in itertools.product(first_layer, layers, activation, dropout, optimizer)]


@dataclass(frozen=True)
class TrainOptions:
    """Training loop settings (paper: 500 epochs, patience 200, batch 10)."""

    max_epochs: int = 500
    patience: int = 200
    batch_size: int = 10
    validation_fraction: float = 0.1
    nadam_lr: float = 2e-3
    adadelta_lr: float = 1.0
    #: torch CPU threads (``None``: torch's default). One is fastest for small cohorts on a
    #: busy machine; wide layers on a real cohort gain from more.
    threads: int | None = None


@dataclass(frozen=True)
class Standardiser:
    """Per-gene mean and SD of the rows a model was trained on."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        std = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(std > 1e-12, std, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


class TrainedNetwork:
    """A fitted network with its standardiser; outputs probabilities."""

    def __init__(self, model: object, standardiser: Standardiser, kind: Kind, params: NetParams, epochs: int) -> None:
        self.model = model
        self.standardiser = standardiser
        self.kind = kind
        self.params = params
        self.epochs = epochs

    def predict(self, x: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """Probabilities ``(n, outputs)``; ``keep`` = gene columns left unmasked (others → 0 after standardising)."""
        import torch

        z = self.standardiser.transform(np.asarray(x, dtype=np.float64))
        if keep is not None:
            masked = np.zeros_like(z)
            masked[:, keep] = z[:, keep]
            z = masked
        self.model.eval()  # type: ignore[attr-defined]
        with torch.no_grad():
            logits = self.model(torch.as_tensor(z, dtype=torch.float32))  # type: ignore[operator]
            probs = torch.sigmoid(logits) if self.kind == "binary" else torch.softmax(logits, dim=1)
        return probs.numpy().astype(np.float64)


def _build(n_in: int, n_out: int, params: NetParams):  # noqa: ANN202 - torch types stay local
    from torch import nn

    layers: list[nn.Module] = []
    width = n_in
    for h in params.hidden():
        layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU() if params.activation == "relu" else nn.Sigmoid(),
                   nn.Dropout(params.dropout)]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def fit_network(x: np.ndarray, y: np.ndarray, params: NetParams, kind: Kind, options: TrainOptions,
                seed: int) -> TrainedNetwork:
    """Train on ``x`` (genes, raw) and ``y`` (``(n, k)`` 0/1 for binary, ``(n,)`` class index for categorical).

    The standardiser is fitted on ``x`` alone. A random ``validation_fraction`` of the rows
    (at least 2) monitors the loss for early stopping; the weights of the best epoch are kept.
    """
    import torch
    from torch import nn

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x = np.asarray(x, dtype=np.float64)
    standardiser = Standardiser.fit(x)
    z = standardiser.transform(x)
    n = len(z)
    order = rng.permutation(n)
    n_val = max(2, int(round(options.validation_fraction * n))) if n >= 20 else 0
    val, train = order[:n_val], order[n_val:]
    xt = torch.as_tensor(z, dtype=torch.float32)
    if kind == "binary":
        yt = torch.as_tensor(np.asarray(y, dtype=np.float32).reshape(n, -1))
        n_out = yt.shape[1]
        loss_fn: nn.Module = nn.BCEWithLogitsLoss()
    else:
        yt = torch.as_tensor(np.asarray(y, dtype=np.int64).reshape(n))
        n_out = int(yt.max().item()) + 1
        loss_fn = nn.CrossEntropyLoss()
    model = _build(z.shape[1], n_out, params)
    if params.optimizer == "nadam":
        opt: torch.optim.Optimizer = torch.optim.NAdam(model.parameters(), lr=options.nadam_lr)
    else:
        opt = torch.optim.Adadelta(model.parameters(), lr=options.adadelta_lr)
    monitor = val if n_val else train
    best_loss, best_state, best_epoch, waited = float("inf"), None, 0, 0
    for epoch in range(options.max_epochs):
        model.train()
        perm = train[rng.permutation(len(train))]
        for start in range(0, len(perm), options.batch_size):
            batch = perm[start:start + options.batch_size]
            if len(batch) < 2:  # batch norm needs two rows
                continue
            opt.zero_grad()
            loss = loss_fn(model(xt[batch]), yt[batch])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            current = float(loss_fn(model(xt[monitor]), yt[monitor]).item())
        if current < best_loss - 1e-6:
            best_loss, best_epoch, waited = current, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= options.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainedNetwork(model, standardiser, kind, params, best_epoch)
