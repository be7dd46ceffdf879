"""A :class:`dicomweb_client.DICOMwebClient` for a configured DICOMweb peer (destination or PACS).

One place that turns ``url`` and ``auth`` (bearer token, or user and password over HTTP
Basic; certificate check on, off, or against a CA bundle) into a client. The client's own
retries are switched off: the outbox (deliveries) and the sweep store (retrievals) own
retries and backoff, so an attempt is one HTTP request and its outcome is recorded.
"""

from __future__ import annotations

from pathlib import Path

import requests
from dicomweb_client import DICOMwebClient

from radnode.config.model import DicomWebAuth

#: Seconds to connect, and to wait for each read of an answer.
DEFAULT_TIMEOUT = (10.0, 120.0)


def dicomweb_client(url: str, auth: DicomWebAuth, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> DICOMwebClient:
    """A client for the service root ``url`` with ``auth``'s credentials and certificate check."""
    session = requests.Session()
    if auth.token:
        session.headers["Authorization"] = f"Bearer {auth.token}"
    elif auth.username and auth.password:
        session.auth = (auth.username, auth.password)
    session.verify = str(auth.verify_tls) if isinstance(auth.verify_tls, Path) else auth.verify_tls
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)
    return client
