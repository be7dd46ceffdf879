"""Apply a re-read configuration to the running node (``systemctl reload radnode``, SIGHUP).

What a reload changes, and what it leaves alone:

* ``routing`` and ``destinations`` take effect at once. The listener, the completion
  checker, the pipeline and the dispatcher all read them from the one live
  :class:`~radnode.config.Settings` object at the moment they route a series or send an
  item, so swapping them in that object is the whole reload: no socket is closed, no
  association is dropped, queued and running jobs keep going (a job routed before the
  reload keeps the destinations its rule named then; names no longer configured are
  skipped with a warning by the pipeline).
* ``logging.level`` takes effect at once.
* Everything else (listener address and AE title, TLS, storage, workers, metrics, model
  bundles, the sweep) is read at start only; a change is logged as needing a restart.

An invalid file changes nothing: the error names every bad key and the node keeps the
configuration it runs with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from radnode.config import ConfigError, Settings

log = logging.getLogger(__name__)

#: Top-level sections a reload applies to the running node.
RELOADABLE_SECTIONS = ("routing", "destinations")
#: Single keys a reload applies (``section.key``).
RELOADABLE_KEYS = ("logging.level",)


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did.

    Attributes
    ----------
    applied
        Sections or keys whose new value is now in effect.
    needs_restart
        Sections whose value changed in the file but only take effect after a restart.
    error
        Why nothing was applied (invalid file), else ``None``.
    """

    applied: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the file was valid (even if nothing changed)."""
        return self.error is None

    def summary(self) -> str:
        """One line for ``STATUS=`` and the journal."""
        if self.error is not None:
            first = self.error.splitlines()[0]
            return f"reload failed, running with the previous configuration: {first}"
        parts = [f"reloaded: {', '.join(self.applied) if self.applied else 'no change'}"]
        if self.needs_restart:
            parts.append(f"restart to apply: {', '.join(self.needs_restart)}")
        return "; ".join(parts)


def reload_settings(live: Settings, load: Callable[[], Settings]) -> ReloadOutcome:
    """Re-read the configuration with ``load`` and apply what can change while running.

    Parameters
    ----------
    live
        The settings object the running node's components hold; changed in place.
    load
        Reads and validates the configuration afresh (``lambda: load_settings(path)``).

    Returns
    -------
    ReloadOutcome
        Applied and restart-only changes, or the validation error.
    """
    try:
        fresh = load()
    except (ConfigError, OSError) as exc:
        outcome = ReloadOutcome(error=str(exc))
        log.error("configuration reload failed; keeping the running configuration:\n%s", exc)
        return outcome

    applied: list[str] = []
    changed = {name: getattr(fresh, name) for name in RELOADABLE_SECTIONS if _dump(getattr(live, name)) != _dump(getattr(fresh, name))}
    if changed:
        # `fresh` was validated as a whole (rules name only configured destinations). Setting
        # the fields one by one would re-run that cross-check against a half-updated object
        # and could reject a valid file, so both are swapped in one dict update: under the
        # GIL, a reader sees the old pair or the new pair.
        live.__dict__.update(changed)
        applied.extend(changed)
    if live.logging.level != fresh.logging.level:
        live.logging.level = fresh.logging.level
        logging.getLogger().setLevel(fresh.logging.level)
        applied.append("logging.level")

    needs_restart = []
    for name in type(live).model_fields:
        if name in RELOADABLE_SECTIONS:
            continue
        before, after = _dump(getattr(live, name)), _dump(getattr(fresh, name))
        if name == "logging" and isinstance(before, dict) and isinstance(after, dict):
            before, after = {**before, "level": None}, {**after, "level": None}
        if before != after:
            needs_restart.append(name)

    outcome = ReloadOutcome(tuple(applied), tuple(needs_restart))
    if needs_restart:
        log.warning("%s (these sections are read at start only)", outcome.summary())
    else:
        log.info("%s", outcome.summary())
    if "routing" in changed or "destinations" in changed:
        log.info(
            "now %d routing rule(s) and %d destination(s): %s",
            len(live.routing),
            len(live.destinations),
            ", ".join(d.name for d in live.destinations) or "none",
        )
    return outcome


def _dump(value: object) -> object:
    """A comparable plain form of a settings value (models, lists of models, scalars)."""
    if isinstance(value, list):
        return [_dump(item) for item in value]
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else value
