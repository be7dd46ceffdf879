"""Routing rules: what to do with a complete series, and why.

Rules come from ``settings.routing`` and are evaluated in order; the first rule whose
conditions all hold decides the action (``process`` with a pipeline profile, ``forward``
to destinations as received, or ``ignore``). A series no rule matches is ignored.

Two guards stand in front of every ``process`` rule, whatever the rules say:

* **loop guard** - objects radnode produced itself (a UID under ``output.uid_root`` and
  Manufacturer or Software Versions naming radnode) never trigger processing, or a
  result sent back to the node would be processed again, forever;
* **not an image series** - SEG, RT Structure Set and SR objects (PS3.4 Annex B SOP
  classes, or those modalities) and localizers (Image Type containing ``LOCALIZER``,
  PS3.3 C.8.2.1.1.1) are never processed; they can still be forwarded or ignored.

Matching conventions: regular expressions use :func:`re.search`, case-insensitive;
``modality`` and ``calling_ae`` compare whole values (modality case-insensitive);
``image_type_contains`` is one value of the multi-valued Image Type (case-insensitive);
ranges are inclusive; a condition on an absent attribute fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from radnode.config.model import RoutingRule, RuleMatch
from radnode.node.series_attributes import SeriesAttributes

if TYPE_CHECKING:
    from radnode.config import Settings

Action = Literal["process", "forward", "ignore"]

#: Manufacturer (0008,0070) written into radnode's own objects.
RADNODE_MANUFACTURER = "radnode"

#: SOP classes that are results, not images to segment (PS3.4 Annex B.5).
NON_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set Storage",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.35": "Extensible SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document Storage",
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.68": "Radiopharmaceutical Radiation Dose SR Storage",
}
#: Modalities (0008,0060) of result objects (PS3.3 C.7.3.1.1.1).
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "SR", "KO", "PR"})
#: Image Type value that marks a scout / localizer image.
LOCALIZER = "LOCALIZER"


@dataclass(frozen=True)
class ConditionCheck:
    """One condition of one rule: what it wants, what the series has, and the verdict."""

    name: str
    wanted: str
    actual: str
    passed: bool


@dataclass(frozen=True)
class RuleCheck:
    """One rule evaluated against a series."""

    rule: RoutingRule
    conditions: tuple[ConditionCheck, ...]
    blocked_by: str | None = None

    @property
    def matched(self) -> bool:
        """All conditions hold."""
        return all(c.passed for c in self.conditions)

    @property
    def applies(self) -> bool:
        """Matched and not stopped by a guard: this rule decides."""
        return self.matched and self.blocked_by is None


@dataclass(frozen=True)
class RoutingDecision:
    """The outcome for one series, with every rule check for ``--explain``."""

    action: Action
    rule_name: str | None
    profile: str | None
    destinations: tuple[str, ...]
    reason: str
    guard: str | None
    checks: tuple[RuleCheck, ...]


def loop_guard(facts: SeriesAttributes, uid_root: str) -> str | None:
    """Why radnode must not process a series it produced itself, or ``None``."""
    prefix = uid_root.rstrip(".") + "."
    uids = [u for u in (facts.series_instance_uid, facts.sop_instance_uid) if u]
    under_root = any(u.startswith(prefix) for u in uids)
    # Exact words only: the synthetic phantom ("radnode-phantom") is input, not output.
    ours = (facts.manufacturer or "").strip().lower() == RADNODE_MANUFACTURER or any(
        (v.split() or [""])[0].lower() == RADNODE_MANUFACTURER for v in facts.software_versions
    )
    if under_root and ours:
        return f"loop guard: produced by radnode (UID under {uid_root}, Manufacturer/SoftwareVersions radnode)"
    return None


def processing_exclusion(facts: SeriesAttributes) -> str | None:
    """Why a series is never processed (SEG, RTSTRUCT, SR, localizer), or ``None``."""
    if facts.sop_class_uid in NON_IMAGE_SOP_CLASSES:
        return f"not processed: {NON_IMAGE_SOP_CLASSES[facts.sop_class_uid]}"
    if (facts.modality or "").upper() in NON_IMAGE_MODALITIES:
        return f"not processed: modality {facts.modality}"
    if any(v.upper() == LOCALIZER for v in facts.image_type):
        return "not processed: localizer (ImageType contains LOCALIZER)"
    return None


def _show(value: object) -> str:
    if value is None or value == () or value == "":
        return "<absent>"
    if isinstance(value, tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _regex(name: str, pattern: str, value: str | None) -> ConditionCheck:
    passed = value is not None and re.search(pattern, value, re.IGNORECASE) is not None
    return ConditionCheck(name, f"matches /{pattern}/i", _show(value), passed)


def check_conditions(match: RuleMatch, facts: SeriesAttributes) -> tuple[ConditionCheck, ...]:
    """Evaluate every condition a rule sets; an empty tuple means "matches everything"."""
    checks: list[ConditionCheck] = []
    if match.modality is not None:
        wanted = [m.upper() for m in match.modality]
        checks.append(
            ConditionCheck("modality", f"one of {wanted}", _show(facts.modality), (facts.modality or "").upper() in wanted)
        )
    if match.body_part is not None:
        checks.append(_regex("body_part", match.body_part, facts.body_part_examined))
    if match.series_description is not None:
        checks.append(_regex("series_description", match.series_description, facts.series_description))
    if match.image_type_contains is not None:
        needle = match.image_type_contains.upper()
        checks.append(
            ConditionCheck(
                "image_type_contains",
                f"ImageType has value {needle}",
                _show(facts.image_type),
                any(v.upper() == needle for v in facts.image_type),
            )
        )
    if match.slice_thickness_min is not None or match.slice_thickness_max is not None:
        low = match.slice_thickness_min
        high = match.slice_thickness_max
        value = facts.slice_thickness
        passed = value is not None and (low is None or value >= low) and (high is None or value <= high)
        wanted = f"{'' if low is None else low} <= SliceThickness <= {'' if high is None else high}".strip()
        checks.append(ConditionCheck("slice_thickness", wanted, _show(value), passed))
    if match.min_instances is not None:
        checks.append(
            ConditionCheck(
                "min_instances",
                f">= {match.min_instances} instances",
                str(facts.instance_count or 0),
                (facts.instance_count or 0) >= match.min_instances,
            )
        )
    if match.calling_ae is not None:
        wanted_aes = [a.strip() for a in match.calling_ae]
        checks.append(
            ConditionCheck(
                "calling_ae",
                f"one of {wanted_aes}",
                _show(facts.calling_ae),
                (facts.calling_ae or "").strip() in wanted_aes,
            )
        )
    if match.station_name is not None:
        checks.append(_regex("station_name", match.station_name, facts.station_name))
    if match.study_date_from is not None or match.study_date_to is not None:
        start, end = match.study_date_from, match.study_date_to
        day = facts.study_day
        passed = day is not None and (start is None or day >= start) and (end is None or day <= end)
        wanted = f"{start or ''} <= StudyDate <= {end or ''}".strip()
        checks.append(ConditionCheck("study_date", wanted, _show(day), passed))
    return tuple(checks)


def evaluate(rules: Sequence[RoutingRule], facts: SeriesAttributes, uid_root: str) -> RoutingDecision:
    """Decide what to do with a series: the first rule that matches and is not guarded.

    Every rule is checked (for ``--explain``), but only the first applicable one decides.
    """
    guard = loop_guard(facts, uid_root) or processing_exclusion(facts)
    checks: list[RuleCheck] = []
    decided: RuleCheck | None = None
    for rule in rules:
        conditions = check_conditions(rule.match, facts)
        matched = all(c.passed for c in conditions)
        blocked = guard if (matched and rule.action == "process" and guard) else None
        check = RuleCheck(rule, conditions, blocked)
        checks.append(check)
        if decided is None and check.applies:
            decided = check
    if decided is None:
        reason = "no rule matched" if guard is None else f"no rule matched ({guard})"
        return RoutingDecision("ignore", None, None, (), reason, guard, tuple(checks))
    rule = decided.rule
    return RoutingDecision(
        rule.action,
        rule.name,
        rule.profile if rule.action == "process" else None,
        tuple(rule.destinations) if rule.action == "forward" else (),
        f"rule {rule.name!r} matched",
        guard,
        tuple(checks),
    )


def decide(settings: Settings, facts: SeriesAttributes) -> RoutingDecision:
    """:func:`evaluate` with the node's current rules and UID root (live path and sweep)."""
    return evaluate(settings.routing, facts, settings.output.uid_root)


#: A routing check the sweep applies to what the archive describes (``decide`` bound to settings).
RouteCheck = Callable[[SeriesAttributes], RoutingDecision]


def format_decision(decision: RoutingDecision, facts: SeriesAttributes) -> str:
    """A human-readable explanation: the series, every rule and condition, the outcome."""
    lines = [
        f"series {facts.series_instance_uid or '<no SeriesInstanceUID>'}",
        f"  modality={_show(facts.modality)} body_part={_show(facts.body_part_examined)} "
        f"description={_show(facts.series_description)!r} image_type={_show(facts.image_type)}",
        f"  slice_thickness={_show(facts.slice_thickness)} instances={facts.instance_count or 0} "
        f"station={_show(facts.station_name)} study_date={_show(facts.study_day)} "
        f"calling_ae={_show(facts.calling_ae)}",
    ]
    if decision.guard:
        lines.append(f"  guard: {decision.guard}")
    for number, check in enumerate(decision.checks, start=1):
        rule = check.rule
        if check.applies and decision.rule_name == rule.name:
            verdict = "MATCH (decides)"
        elif check.matched and check.blocked_by:
            verdict = f"matched but skipped: {check.blocked_by}"
        elif check.matched:
            verdict = "match (an earlier rule decided)"
        else:
            verdict = "no match"
        lines.append(f"  rule {number} {rule.name!r} -> {rule.action}: {verdict}")
        if not check.conditions:
            lines.append("    (no conditions: matches every series)")
        for cond in check.conditions:
            mark = "ok  " if cond.passed else "FAIL"
            lines.append(f"    [{mark}] {cond.name}: wants {cond.wanted}; series has {cond.actual}")
    target = ""
    if decision.action == "process":
        target = f" (profile {decision.profile})"
    elif decision.action == "forward":
        target = f" (to {', '.join(decision.destinations)})"
    lines.append(f"  => {decision.action}{target}: {decision.reason}")
    return "\n".join(lines)
