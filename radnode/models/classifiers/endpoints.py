"""Prediction endpoints as configuration: name, classes and how label texts map to them.

An endpoint is data, not code: the built-in set (:data:`ENDPOINTS`) covers the endpoints of
the Deep-RadScore study (``shared/papers/001``: EGFR, KRAS, ALK, TP53, PIK3CA, ROS1 mutation
status, PD-1/PD-L1 expression, lymphovascular invasion LVI, pleural invasion PI) and the
RA-Seg study (``shared/papers/000``: EGFR), plus the multi-class T-stage; more can be read
from a mapping (e.g. a YAML section) with :func:`endpoint_from_mapping`.

Label encoding
--------------
Every class has an index (its position in ``classes``) and a set of accepted spellings
(case-insensitive, surrounding blanks ignored). For binary endpoints index 1 is the
positive class (mutant / expressed / present), the one whose probability a classifier
reports and whose AUC is computed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Spellings of the negative and positive class of a binary endpoint.
NEGATIVE_SPELLINGS = ("0", "neg", "negative", "wt", "wild", "wildtype", "wild-type", "wild type",
                      "absent", "no", "false", "none", "non-expression")
POSITIVE_SPELLINGS = ("1", "pos", "positive", "mut", "mutant", "mutated", "mutation", "present", "yes",
                      "true", "expression", "expressed", "fusion", "rearranged")


class EndpointError(ValueError):
    """An unknown endpoint or a label text that the endpoint does not accept."""


@dataclass(frozen=True)
class Endpoint:
    """One prediction target.

    Attributes
    ----------
    name
        Identifier (also the label column looked for in a label table).
    description
        What it means, for reports.
    classes
        Class names in index order; binary endpoints have exactly two, positive last.
    spellings
        Accepted label texts per class (lower case), same order as ``classes``.
    """

    name: str
    description: str
    classes: tuple[str, ...]
    spellings: tuple[tuple[str, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise EndpointError(f"endpoint {self.name!r} needs at least two classes, got {list(self.classes)}")
        if not self.spellings:
            object.__setattr__(self, "spellings", tuple((c.lower(), str(i)) for i, c in enumerate(self.classes)))
        if len(self.spellings) != len(self.classes):
            raise EndpointError(f"endpoint {self.name!r}: one spelling list per class is required")
        seen: dict[str, str] = {}
        for cls, words in zip(self.classes, self.spellings):
            for w in (*words, cls.lower()):
                if seen.get(w, cls) != cls:
                    raise EndpointError(f"endpoint {self.name!r}: label {w!r} names both {seen[w]!r} and {cls!r}")
                seen[w] = cls

    @property
    def binary(self) -> bool:
        """Two classes (positive = index 1)."""
        return len(self.classes) == 2

    @property
    def positive_class(self) -> str | None:
        return self.classes[1] if self.binary else None

    def _normalise(self, text: str) -> str:
        return re.sub(r"\s+", " ", str(text).strip().lower())

    def encode_one(self, text: object) -> int:
        """Class index of one label text.

        Raises
        ------
        EndpointError
            Naming the endpoint, the text and the accepted spellings.
        """
        t = self._normalise(str(text))
        if isinstance(text, float) and float(text).is_integer():
            t = str(int(text))
        for index, (cls, words) in enumerate(zip(self.classes, self.spellings)):
            if t == cls.lower() or t in words:
                return index
        allowed = {c: sorted({c.lower(), *w}) for c, w in zip(self.classes, self.spellings)}
        raise EndpointError(f"endpoint {self.name}: label {str(text)[:30]!r} is not one of {allowed}")

    def encode(self, texts: Sequence[object]) -> np.ndarray:
        """Class indices (int64) of label texts."""
        return np.array([self.encode_one(t) for t in texts], dtype=np.int64)

    def decode(self, indices: Sequence[int]) -> list[str]:
        """Class names of class indices."""
        return [self.classes[int(i)] for i in indices]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "classes": list(self.classes),
            "spellings": [list(s) for s in self.spellings],
            "binary": self.binary,
        }


def binary_endpoint(name: str, description: str, negative: str, positive: str,
                    extra_negative: Sequence[str] = (), extra_positive: Sequence[str] = ()) -> Endpoint:
    """A two-class endpoint with the usual spellings (0/1, negative/positive, wild type/mutant ...)."""
    return Endpoint(
        name=name,
        description=description,
        classes=(negative, positive),
        spellings=(tuple(NEGATIVE_SPELLINGS) + tuple(extra_negative), tuple(POSITIVE_SPELLINGS) + tuple(extra_positive)),
    )


def _mutation(gene: str) -> Endpoint:
    return binary_endpoint(gene, f"{gene} mutation status (tumour tissue)", "wild-type", "mutant")


#: T categories (UICC/AJCC TNM 8th edition) of the T-stage endpoint; sub-categories fold in.
T_STAGES = ("T1", "T2", "T3", "T4")


def _t_stage() -> Endpoint:
    spellings = []
    for i, stage in enumerate(T_STAGES, start=1):
        subs = [f"t{i}{s}" for s in ("", "a", "b", "c", "mi")]
        spellings.append((str(i), *subs))
    return Endpoint("T-stage", "primary tumour T category (TNM 8th ed.), multi-class", T_STAGES, tuple(spellings))


#: The built-in endpoints, by name.
ENDPOINTS: dict[str, Endpoint] = {
    e.name: e
    for e in (
        _mutation("EGFR"),
        _mutation("KRAS"),
        binary_endpoint("ALK", "ALK rearrangement status", "negative", "positive"),
        _mutation("TP53"),
        _mutation("PIK3CA"),
        binary_endpoint("ROS1", "ROS1 rearrangement status", "negative", "positive"),
        binary_endpoint("PD-L1", "PD-1/PD-L1 expression (tumour proportion score above the study cut-off)",
                        "non-expression", "expression", extra_negative=("low",), extra_positive=("high",)),
        binary_endpoint("LVI", "lymphovascular invasion", "absent", "present"),
        binary_endpoint("PI", "visceral pleural invasion", "absent", "present"),
        _t_stage(),
    )
}

#: Endpoint of the demo classifiers: the phantom's planted binary "mutation" label.
DEMO_ENDPOINT = binary_endpoint("PHANTOM-MUTATION", "planted synthetic mutation label of the radnode phantom (DEMO)",
                                "wild-type", "mutant")


def get_endpoint(name: str, extra: Mapping[str, Endpoint] | None = None) -> Endpoint:
    """Endpoint by name (case-insensitive; ``PDL1``/``PD_L1`` and ``TSTAGE``/``T_stage`` accepted).

    Raises
    ------
    EndpointError
        Naming the allowed endpoints.
    """
    pool = {**ENDPOINTS, DEMO_ENDPOINT.name: DEMO_ENDPOINT, **(extra or {})}
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for e_name, endpoint in pool.items():
        if re.sub(r"[^a-z0-9]", "", e_name.lower()) == key:
            return endpoint
    raise EndpointError(f"unknown endpoint {name!r}; allowed: {', '.join(pool)}")


def endpoint_from_mapping(data: Mapping[str, Any]) -> Endpoint:
    """An endpoint from configuration, e.g. ``{"name": "STK11", "classes": ["wt", "mut"]}``.

    Keys: ``name`` (required), ``classes`` (required, positive last when binary),
    ``description``, ``spellings`` (one list per class). A binary endpoint without
    ``spellings`` gets the usual negative/positive spellings.
    """
    try:
        name = str(data["name"])
        classes = tuple(str(c) for c in data["classes"])
    except KeyError as exc:
        raise EndpointError(f"endpoint configuration needs {exc.args[0]!r}; got keys {sorted(data)}") from None
    description = str(data.get("description", name))
    spellings = data.get("spellings")
    if spellings is None and len(classes) == 2:
        return binary_endpoint(name, description, classes[0], classes[1])
    sp = tuple(tuple(str(w).lower() for w in s) for s in (spellings or ()))
    return Endpoint(name, description, classes, sp)
