"""A throw-away Orthanc on loopback for tests, benchmarks and pipeline checks.

:class:`OrthancServer` writes a temporary JSON configuration (free DICOM and HTTP
ports, storage and index in a temporary folder, no plugins, HTTP reachable only from
this host), starts the ``Orthanc`` executable with ``TCP_NODELAY=1`` in its environment
(DCMTK stalls ~45 ms per message on loopback without it, see BENCHMARKS.md), waits until
its REST API answers, and stops it on exit::

    with OrthancServer(modalities={"RADNODE": ("RADNODE", "127.0.0.1", 11112)}) as pacs:
        ...  # C-STORE to ("127.0.0.1", pacs.dicom_port), AE pacs.aet
        assert pacs.study_series(study_uid)

The REST helpers use only the standard library and return Orthanc's JSON as is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

#: Name of the Debian package's executable.
ORTHANC_EXECUTABLE = "Orthanc"
#: Seconds to wait for the REST API after start.
DEFAULT_STARTUP_TIMEOUT = 30.0
#: Seconds to wait for a graceful stop before killing.
STOP_TIMEOUT = 10.0
#: Attempts with fresh ports when a port was taken between probing and binding.
START_ATTEMPTS = 3
_POLL_INTERVAL = 0.05


class OrthancError(RuntimeError):
    """Orthanc did not start, died, or a REST call failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class OrthancServer:
    """Orthanc in a temporary folder on free loopback ports; a context manager.

    Parameters
    ----------
    aet
        Orthanc's own AE title (``DicomAet``).
    modalities
        ``DicomModalities``: name -> (AE title, host, port) of peers Orthanc may
        send to (C-MOVE destinations, C-STORE targets).
    extra_config
        Further configuration keys, merged over the defaults.
    workdir
        Folder for configuration, storage and log; a temporary folder (removed on
        stop) when ``None``.
    startup_timeout
        Seconds to wait for the REST API.
    executable
        The Orthanc binary.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        workdir: Path | str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        executable: str = ORTHANC_EXECUTABLE,
    ) -> None:
        if not 1 <= len(aet) <= 16:
            raise ValueError(f"aet {aet!r} must be 1-16 characters (PS3.5 AE)")
        self.aet = aet
        self.host = "127.0.0.1"
        self.modalities = dict(modalities or {})
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.executable = executable
        self._own_workdir = workdir is None
        self._workdir = Path(workdir) if workdir is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: Any = None
        self.dicom_port = 0
        self.http_port = 0

    # --- lifecycle -------------------------------------------------------------------
    @property
    def workdir(self) -> Path:
        """Folder holding ``orthanc.json``, ``storage/``, ``index/`` and ``orthanc.log``."""
        if self._workdir is None:
            raise OrthancError("Orthanc has not been started")
        return self._workdir

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """Orthanc's combined stdout/stderr."""
        return self.workdir / "orthanc.log"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._process is not None and self._process.poll() is None

    def config(self) -> dict[str, Any]:
        """The configuration written for the current ports."""
        storage = self.workdir / "storage"
        cfg: dict[str, Any] = {
            "Name": "radnode-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                name: [ae, host, int(port)] for name, (ae, host, port) in self.modalities.items()
            },
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "StableAge": 2,
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self) -> OrthancServer:
        """Start Orthanc and wait until its REST API answers."""
        if self.running:
            return self
        if shutil.which(self.executable) is None:
            raise OrthancError(
                f"executable {self.executable!r} not found on PATH; install the Debian "
                "package 'orthanc'"
            )
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="radnode-orthanc-"))
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(START_ATTEMPTS):
            self.dicom_port = free_port(self.host)
            self.http_port = free_port(self.host)
            while self.http_port == self.dicom_port:
                self.http_port = free_port(self.host)
            config_path = self.workdir / "orthanc.json"
            config_path.write_text(json.dumps(self.config(), indent=2))
            env = dict(os.environ, TCP_NODELAY="1")
            self._log_handle = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._process = subprocess.Popen(
                [self.executable, str(config_path)],
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
            try:
                self._wait_ready()
            except OrthancError as exc:
                last_error = str(exc)
                self._terminate()
                continue
            logger.info(
                "Orthanc %s started: DICOM %s:%d, HTTP %s", self.aet, self.host,
                self.dicom_port, self.url,
            )
            return self
        self._cleanup()
        raise OrthancError(f"Orthanc did not start after {START_ATTEMPTS} attempts: {last_error}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise OrthancError(f"Orthanc exited with code {code}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(_POLL_INTERVAL)
        raise OrthancError(
            f"Orthanc's REST API at {self.url} did not answer within {self.startup_timeout} s:\n"
            f"{self._log_tail()}"
        )

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def _cleanup(self) -> None:
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def stop(self) -> None:
        """Stop Orthanc (gracefully, then by force) and remove a temporary folder."""
        self._terminate()
        self._cleanup()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- REST --------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout: float = 30.0) -> Any:
        """Call the REST API; returns decoded JSON (or raw bytes when not JSON)."""
        if not self.running:
            raise OrthancError(f"Orthanc is not running (log tail:\n{self._log_tail()})")
        req = urllib.request.Request(
            f"{self.url}/{path.lstrip('/')}", data=body, method=method,
            headers={"Content-Type": content_type} if body is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                payload = response.read()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise OrthancError(f"{method} {path} -> HTTP {exc.code}: {detail}") from exc
        if "json" in kind:
            return json.loads(payload or b"null")
        return payload

    def get(self, path: str) -> Any:
        """GET ``path`` (e.g. ``/studies``)."""
        return self.request("GET", path)

    def upload(self, data: bytes) -> dict[str, Any]:
        """Store one DICOM file over HTTP (``POST /instances``)."""
        return dict(self.request("POST", "/instances", data, "application/dicom"))

    def system(self) -> dict[str, Any]:
        """``GET /system``: version, AE title, ports."""
        return dict(self.get("/system"))

    def statistics(self) -> dict[str, Any]:
        """``GET /statistics``: counts of patients, studies, series, instances."""
        return dict(self.get("/statistics"))

    def studies(self) -> list[dict[str, Any]]:
        """All studies, expanded (``MainDicomTags``, ``Series`` ids, ...)."""
        return list(self.get("/studies?expand"))

    def series(self) -> list[dict[str, Any]]:
        """All series, expanded."""
        return list(self.get("/series?expand"))

    def instances(self) -> list[dict[str, Any]]:
        """All instances, expanded."""
        return list(self.get("/instances?expand"))

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Orthanc resources whose DICOM UID is ``uid`` (``POST /tools/lookup``)."""
        return list(self.request("POST", "/tools/lookup", uid.encode("ascii"), "text/plain"))

    def _orthanc_id(self, uid: str, level: str) -> str | None:
        for hit in self.lookup(uid):
            if hit.get("Type") == level:
                return str(hit["ID"])
        return None

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """The study with this Study Instance UID, expanded, or ``None``."""
        oid = self._orthanc_id(study_uid, "Study")
        return None if oid is None else dict(self.get(f"/studies/{oid}"))

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """Series (expanded) of the study with this Study Instance UID; empty if unknown."""
        oid = self._orthanc_id(study_uid, "Study")
        return [] if oid is None else list(self.get(f"/studies/{oid}/series"))

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        """Instances (expanded) of the series with this Series Instance UID."""
        oid = self._orthanc_id(series_uid, "Series")
        return [] if oid is None else list(self.get(f"/series/{oid}/instances"))

    def instance_tags(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """Simplified tags of the instance with this SOP Instance UID, or ``None``."""
        oid = self._orthanc_id(sop_instance_uid, "Instance")
        return None if oid is None else dict(self.get(f"/instances/{oid}/simplified-tags"))

    def instance_file(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file of an instance."""
        oid = self._orthanc_id(sop_instance_uid, "Instance")
        if oid is None:
            raise OrthancError(f"no instance with SOP Instance UID {sop_instance_uid}")
        return bytes(self.request("GET", f"/instances/{oid}/file"))
