"""Who may associate: called AE, calling-AE allow-list, peer host allow-list.

The decision is a pure function of the A-ASSOCIATE-RQ and the ``node`` settings, so it is
tested without a network. A refusal carries the A-ASSOCIATE-RJ Result, Source and
Reason/Diag. of PS3.8 §9.3.4 (Table 9-21): a wrong called AE title is "called-AE-title-
not-recognized", an unknown calling AE title (``node.strict``) "calling-AE-title-not-
recognized", and a host outside ``node.allowed_hosts`` "no-reason-given" (the standard has
no code for it, and telling a stranger why helps nobody).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from radnode.config.model import NodeSettings
from radnode.node.status import RejectReason, RejectResult, RejectSource


#: ``node.host`` values that listen on every interface of the machine.
ALL_INTERFACES = frozenset({"0.0.0.0", "::", ""})


def exposure_warnings(node: NodeSettings) -> list[str]:
    """What an operator must know about who can reach the node, in plain words.

    Said at start-up (the listener logs each as a warning) and by ``radnode config check``,
    so a configuration that is open -- or shut to everyone -- is noticed before it matters.
    """
    warnings = []
    everywhere = node.host.strip() in ALL_INTERFACES
    hosts = "any host" if not node.allowed_hosts else "the hosts in node.allowed_hosts"
    if not node.strict and everywhere:
        warnings.append(
            f"open node: listening on every interface ({node.host or 'all'}) and accepting ANY calling AE title "
            f"from {hosts} (node.strict is off); for production set node.strict: true and list "
            "node.allowed_calling_aes (and node.allowed_hosts)"
        )
    elif not node.strict:
        warnings.append(
            f"node.strict is off: ANY calling AE title from {hosts} that reaches {node.host} is accepted"
        )
    elif not node.allowed_calling_aes:
        warnings.append(
            "node.strict is on and node.allowed_calling_aes is empty: EVERY association is refused. "
            "List the calling AE titles that may send (e.g. node.allowed_calling_aes: [CT_SCANNER_1, PACS_MAIN]) "
            "and restart the node"
        )
    return warnings


@dataclass(frozen=True)
class AccessDecision:
    """Accept, or reject with the A-ASSOCIATE-RJ fields and a reason for the audit log."""

    accepted: bool
    explanation: str
    result: RejectResult | None = None
    source: RejectSource | None = None
    reason: RejectReason | None = None
    unlisted_calling_ae: bool = False


class AccessPolicy:
    """The association access rules of one node.

    Parameters
    ----------
    node
        ``node`` settings: ``ae_title``, ``strict``, ``allowed_calling_aes``,
        ``allowed_hosts``.
    """

    def __init__(self, node: NodeSettings) -> None:
        self.ae_title = node.ae_title.strip()
        self.strict = node.strict
        self.allowed_calling_aes = frozenset(ae.strip() for ae in node.allowed_calling_aes)
        self.allowed_networks = tuple(ipaddress.ip_network(h, strict=False) for h in node.allowed_hosts)

    @property
    def accepts_any_calling_ae(self) -> bool:
        """True when an unknown calling AE is let in (the ``make run`` default)."""
        return not self.strict

    def check(self, calling_ae: str, called_ae: str, peer_address: str) -> AccessDecision:
        """Decide on one association request."""
        calling = calling_ae.strip()
        called = called_ae.strip()
        if self.allowed_networks and not self._host_allowed(peer_address):
            return AccessDecision(
                False,
                f"peer {peer_address} is not in node.allowed_hosts",
                RejectResult.PERMANENT,
                RejectSource.SERVICE_USER,
                RejectReason.NO_REASON_GIVEN,
            )
        if called != self.ae_title:
            return AccessDecision(
                False,
                f"called AE title {called!r} is not ours ({self.ae_title!r})",
                RejectResult.PERMANENT,
                RejectSource.SERVICE_USER,
                RejectReason.CALLED_AE_NOT_RECOGNIZED,
            )
        if calling not in self.allowed_calling_aes:
            if self.strict:
                return AccessDecision(
                    False,
                    f"calling AE title {calling!r} is not in node.allowed_calling_aes (node.strict)",
                    RejectResult.PERMANENT,
                    RejectSource.SERVICE_USER,
                    RejectReason.CALLING_AE_NOT_RECOGNIZED,
                )
            return AccessDecision(True, f"calling AE title {calling!r} accepted (node.strict is off)", unlisted_calling_ae=True)
        return AccessDecision(True, f"calling AE title {calling!r} is allowed")

    def _host_allowed(self, peer_address: str) -> bool:
        try:
            address = ipaddress.ip_address(peer_address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allowed_networks)
