"""A :class:`dicomweb_client.DICOMwebClient` for a configured DICOMweb peer (destination or PACS).

One place that turns ``url`` and ``auth`` (bearer token, or user and password over HTTP
Basic; certificate check on, off, or against a CA bundle) into a client. The client's own
retries are switched off: the outbox (deliveries) and the sweep store (retrievals) own
retries and backoff, so an attempt is one HTTP request and its outcome is recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests
from dicomweb_client import DICOMwebClient

from radnode.config.model import DicomWebAuth

#: Seconds to connect, and to wait for each read of an answer.
DEFAULT_TIMEOUT = (10.0, 120.0)


class _Session(requests.Session):
    """A session whose configured certificate check wins over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE.

    requests lets those variables override ``Session.verify``; a CA bundle or ``false`` set
    for one peer in radnode's settings must not be replaced by the machine's default bundle.
    """

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict[str, Any]:
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.verify is not True:
            merged["verify"] = self.verify
        return merged


def dicomweb_client(url: str, auth: DicomWebAuth, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> DICOMwebClient:
    """A client for the service root ``url`` with ``auth``'s credentials and certificate check."""
    session = _Session()
    if auth.token:
        session.headers["Authorization"] = f"Bearer {auth.token}"
    elif auth.username and auth.password:
        session.auth = (auth.username, auth.password)
    session.verify = str(auth.verify_tls) if isinstance(auth.verify_tls, Path) else auth.verify_tls
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)
    return client
