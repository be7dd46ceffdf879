"""The DICOMweb receiver: STOW-RS ``POST /dicomweb/studies[/{study}]`` on its own port (8112).

A small ASGI app, served by uvicorn on a daemon thread of ``radnode serve`` (like the
dashboard, with the same TLS settings), that hands each request to
:mod:`radnode.node.stow` and so to the listener's own :class:`~radnode.node.ingest.Ingestor`.
Before a byte of the body is read, a request is refused when it has no valid bearer token
(401; the token's name in ``dicomweb.tokens`` is the caller's identity, used as its calling
AE title by the access rules, routing and audit), when the node's access rules refuse that
name or the client address (403), when its media type is not multipart/related of
application/dicom (415), or when its Content-Length exceeds ``dicomweb.max_request_mb`` (413).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from radnode.config import Settings
from radnode.node.access import AccessPolicy
from radnode.node.ingest import Ingestor
from radnode.node.stow import StowBody, StowReceiver, StowRequestError
from radnode.node.storage import InvalidUIDError, validate_uid
from radnode.web.server import UvicornRunner, is_loopback

LOGGER = logging.getLogger("radnode.dicomweb")

#: Media type of the Store Instances response body (PS3.18 §8.7.3.5.2).
DICOM_JSON = "application/dicom+json"
#: Path prefix of the DICOMweb service root.
PREFIX = "/dicomweb"


class DicomJSONResponse(JSONResponse):
    media_type = DICOM_JSON


def _refuse(http_status: int, message: str, **headers: str) -> Response:
    return PlainTextResponse(f"{http_status}: {message}\n", status_code=http_status, headers=headers or None)


def _caller(settings: Settings, request: Request) -> str | None:
    """The name of the token presented as ``Authorization: Bearer``; None when none matches."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    given = presented.strip().encode()
    match = None
    for name, token in settings.dicomweb.tokens.items():
        if hmac.compare_digest(given, token.encode()):  # every token compared: no timing hint
            match = name
    return match


async def store_instances(request: Request) -> Response:
    """STOW-RS Store Instances (PS3.18 §10.5)."""
    app_state = request.app.state
    settings: Settings = app_state.settings
    peer = request.client.host if request.client else ""
    caller = _caller(settings, request)
    if caller is None:
        LOGGER.warning("STOW-RS from %s refused: no valid bearer token", peer)
        app_state.ingestor.audit.record("stow-refused", peer_address=peer, status="401", reason="no valid bearer token")
        return _refuse(401, "a valid bearer token is required (dicomweb.tokens)", **{"WWW-Authenticate": 'Bearer realm="radnode"'})
    decision = app_state.access.check(caller, settings.node.ae_title, peer)
    if not decision.accepted:
        app_state.ingestor.audit.record("stow-refused", calling_ae=caller, peer_address=peer, status="403", reason=decision.explanation)
        return _refuse(403, decision.explanation)
    study_uid = request.path_params.get("study")
    if study_uid is not None:
        try:
            study_uid = validate_uid(study_uid, "StudyInstanceUID")
        except InvalidUIDError as exc:
            return _refuse(400, str(exc))
    limit = settings.dicomweb.max_request_mb * 1024 * 1024
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        app_state.ingestor.audit.record("stow-refused", calling_ae=caller, peer_address=peer, status="413", size=None, detail=f"Content-Length {length[:20]}")
        return _refuse(413, f"Content-Length {length[:20]} exceeds dicomweb.max_request_mb ({limit} bytes)")
    try:
        body = StowBody(request.headers.get("content-type"), app_state.ingestor.store.tmp_dir, limit)
    except StowRequestError as exc:
        return _refuse(exc.http_status, exc.message)
    try:
        try:
            async for chunk in request.stream():
                body.feed(chunk)
            parts = body.finish()
        except StowRequestError as exc:
            LOGGER.warning("STOW-RS from %s (%s) refused: %s", caller, peer, exc.message)
            app_state.ingestor.audit.record(
                "stow-refused", calling_ae=caller, peer_address=peer, status=str(exc.http_status), detail=exc.message
            )
            return _refuse(exc.http_status, exc.message)
        result = await run_in_threadpool(app_state.receiver.store, parts, caller, peer, study_uid)
    finally:
        body.discard()
    base = f"{request.url.scheme}://{request.url.netloc}{PREFIX}"
    LOGGER.info(
        "STOW-RS from %s: %d stored, %d failed (HTTP %d)", caller, len(result.stored), len(result.failed), result.http_status
    )
    return DicomJSONResponse(result.response(base), status_code=result.http_status)


def create_dicomweb_app(settings: Settings, ingestor: Ingestor) -> Starlette:
    """The STOW-RS app for a node whose instances enter through ``ingestor``."""
    routes = [
        Route(f"{PREFIX}/studies", store_instances, methods=["POST"]),
        Route(f"{PREFIX}/studies/{{study}}", store_instances, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.settings = settings
    app.state.ingestor = ingestor
    app.state.receiver = StowReceiver(ingestor)
    app.state.access = AccessPolicy(settings.node)
    return app


def dicomweb_warnings(settings: Settings) -> list[str]:
    """Start-up (and ``radnode config check``) warnings for an enabled STOW-RS receiver."""
    dw = settings.dicomweb
    if not dw.enabled:
        return []
    warnings = []
    if not dw.tokens:
        warnings.append("dicomweb.tokens is empty: every STOW-RS request is refused (401); add NAME: TOKEN pairs")
    if not (is_loopback(dw.host) or dw.tls.enabled):
        warnings.append(
            f"DICOMweb bound to {dw.host}:{dw.port} without TLS: bearer tokens and images cross the network in "
            "clear text; set dicomweb.tls (cert_file, key_file) or bind to 127.0.0.1 behind a TLS proxy"
        )
    return warnings


class DicomWebServer:
    """The STOW-RS app served by uvicorn on a background thread (bound in :meth:`start`)."""

    def __init__(self, settings: Settings, ingestor: Ingestor) -> None:
        dw = settings.dicomweb
        self.settings = settings
        self._runner = UvicornRunner(create_dicomweb_app(settings, ingestor), dw.host, dw.port, dw.tls, "dicomweb")
        self.config = self._runner.config

    @property
    def port(self) -> int:
        return self._runner.port

    @property
    def url(self) -> str:
        """The service root, e.g. ``http://127.0.0.1:8112/dicomweb``."""
        return f"{self._runner.origin}{PREFIX}"

    def start(self) -> None:
        """Bind (``OSError`` when the port is taken), then serve on a daemon thread."""
        self._runner.start()
        for warning in dicomweb_warnings(self.settings):
            LOGGER.warning("%s", warning)
        LOGGER.info("DICOMweb STOW-RS on %s/studies", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Let open requests finish, then stop; close the socket."""
        self._runner.stop(timeout)


def start_dicomweb(settings: Settings, ingestor: Ingestor) -> Any:
    """A started :class:`DicomWebServer` when ``dicomweb.enabled``, else None (``OSError`` when the port is busy)."""
    if not settings.dicomweb.enabled:
        return None
    server = DicomWebServer(settings, ingestor)
    server.start()
    return server
