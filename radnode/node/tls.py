"""The TLS context of the listener (DICOM over TLS, PS3.15 Annex B.1 / BCP 195 profile).

TLS 1.2 is the minimum (PS3.15 B.9 "BCP 195 TLS Secure Transport Connection Profile").
With ``ca_file`` set, a client certificate is checked against it when offered; with
``require_client_cert`` one must be offered, which is how a node restricts itself to the
hosts that hold certificates from the hospital's CA.
"""

from __future__ import annotations

import ssl

from radnode.config.model import TLSSettings


class TLSConfigError(ValueError):
    """A certificate, key or CA file named in ``node.tls`` cannot be used."""


def build_server_context(tls: TLSSettings) -> ssl.SSLContext:
    """Return a server-side :class:`ssl.SSLContext` for ``node.tls``.

    Raises
    ------
    TLSConfigError
        When a file is missing or does not hold what its setting says.
    """
    if tls.cert_file is None or tls.key_file is None:
        raise TLSConfigError("node.tls needs cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"node.tls.cert_file {tls.cert_file} / key_file {tls.key_file}: cannot load certificate and key ({exc})"
        ) from exc
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"node.tls.ca_file {tls.ca_file}: cannot load CA certificates ({exc})") from exc
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
