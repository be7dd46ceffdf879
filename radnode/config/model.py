"""The one settings model of radnode.

Every tunable of the node lives here, grouped by the part of the system that reads it.
Defaults are the embedded configuration that ``make run`` starts with: SQLite and a local
data folder, AE title ``RADNODE`` on port 11112, the bundled demo model, any calling AE
accepted (with a warning at start). Unknown keys are rejected (``extra="forbid"``) so a
typo in a YAML file fails loudly instead of being silently ignored.

Sources, highest priority first: environment ``RADNODE_<SECTION>__<KEY>``, the YAML file,
these defaults (see :mod:`radnode.config.loader`).
"""

from __future__ import annotations

import ipaddress
import re
from datetime import date, time
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

#: PS3.5 §6.2: an AE title is 1–16 characters of the default repertoire, no backslash or
#: control characters; leading/trailing spaces are not significant.
AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"
#: PS3.5 §9.1: a UID root is digits and dots, no leading zeros in a component.
UID_ROOT_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"



#: The shipped DEMO EGFR classifier bundle (package data; see
#: radnode.models.classifiers.demo_training). Resolved from this file so that config does
#: not import the models.
DEMO_CLASSIFIER_BUNDLE = Path(__file__).resolve().parent.parent / "models" / "classifiers" / "demo" / "egfr-demo"


def _check_ae_title(value: str) -> str:
    if not re.fullmatch(AE_TITLE_PATTERN, value) or not value.strip():
        raise ValueError(
            "an AE title is 1-16 printable ASCII characters without backslash (PS3.5 §6.2)"
        )
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    """Base for every section: strict about unknown keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ResultObject(str, Enum):
    """The result objects radnode produces and can send to a destination."""

    SEG = "SEG"
    RTSTRUCT = "RTSTRUCT"
    SR = "SR"


class UncertainContourPolicy(str, Enum):
    """What a destination gets when the tumour contour is flagged uncertain (radnode.models.quality)."""

    SEND = "send"  # the objects as they are, flagged (ROI name suffix, SR finding)
    HOLD = "hold"  # the delivery waits in the outbox for a person (radnode jobs release ID)
    SKIP_TUMOUR = "skip_tumour"  # lungs-only SEG/RTSTRUCT written for it; no SR


class TLSSettings(_Section):
    """TLS for the listener (DICOM over TLS, PS3.15 Annex B)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = Field(
        default=None, description="CA bundle that client certificates must chain to."
    )
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs both cert_file and key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs ca_file to verify clients against")
        return self


class NodeSettings(_Section):
    """The DICOM listener: who we are and whom we accept."""

    ae_title: AETitle = "RADNODE"
    host: str = Field(default="0.0.0.0", description="Address to bind the listener to.")
    port: Port = 11112
    strict: bool = Field(
        default=False,
        description="Reject calling AEs not in allowed_calling_aes. When false and the list "
        "is empty, any calling AE is accepted and a warning is logged at start.",
    )
    allowed_calling_aes: list[AETitle] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Peer IP addresses or networks (CIDR) allowed to associate; empty = any.",
    )
    max_associations: int = Field(default=16, ge=1, le=256)
    max_pdu: int = Field(
        default=0,
        ge=0,
        description="Maximum PDU length we accept in bytes; 0 = unlimited (fastest).",
    )
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=120.0, gt=0)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    fast_receive: bool = Field(
        default=True,
        description="Receive through radnode's tuned pynetdicom path (node/fastpath.py: select-based "
        "DUL, zero-copy P-DATA, C-STORE answered on the DUL thread; about 2x the throughput). "
        "false = pynetdicom's ordinary path. A start-up self-test falls back to it, with a "
        "warning, when the pynetdicom internals the fast path needs are not as expected.",
    )

    @field_validator("max_pdu")
    @classmethod
    def _pdu_range(cls, value: int) -> int:
        # PS3.8 §D.3.3.2.1: a non-zero maximum length must hold at least one PDV header.
        if value and value < 4096:
            raise ValueError("max_pdu must be 0 (unlimited) or at least 4096 bytes")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from exc
        return value


class StorageSettings(_Section):
    """Where received instances, results and the database live."""

    data_dir: Path = Path("radnode-data")
    min_free_gb: float = Field(
        default=1.0,
        ge=0,
        description="Below this free space the node answers C-STORE with 0xA700.",
    )
    retention_days: int = Field(
        default=30,
        ge=0,
        description="Days to keep processed input series; 0 keeps them forever.",
    )
    index_sync: Literal["normal", "full"] = Field(
        default="normal",
        description="How the node's SQLite index commits each instance row: 'normal' does "
        "not fsync the WAL (files stay fsync'ed before Success, and rows a power loss "
        "rolls back are re-indexed from the files at start-up); 'full' fsyncs every commit.",
    )
    quarantine_max_gb: float = Field(
        default=2.0, ge=0, description="Most space rejected data may take in quarantine/; the oldest items go first."
    )
    quarantine_max_items: int = Field(
        default=10_000, ge=0, description="Most rejected items kept in quarantine/; the oldest go first."
    )
    quarantine_per_minute: int = Field(
        default=30,
        ge=0,
        description="Rejected items quarantined per minute per calling AE and host; beyond it they are "
        "refused and audited but not kept (0: never keep rejected data).",
    )
    feature_db_url: str = Field(
        default="",
        description="SQLAlchemy URL of the research feature database every processed series adds "
        "its radiomic features to ('' = sqlite file features.sqlite in data_dir); see docs/research.md.",
    )


class SeriesSettings(_Section):
    """When a series counts as complete (DICOM itself has no such notion)."""

    quiet_seconds: float = Field(default=60.0, gt=0)
    force_seconds: float = Field(default=1800.0, gt=0)
    on_update: Literal["reprocess", "ignore"] = "reprocess"

    @model_validator(mode="after")
    def _force_after_quiet(self) -> SeriesSettings:
        if self.force_seconds < self.quiet_seconds:
            raise ValueError(
                f"force_seconds ({self.force_seconds}) must not be shorter than "
                f"quiet_seconds ({self.quiet_seconds})"
            )
        return self


class QCSettings(_Section):
    """Acceptance limits for an input CT series (see :class:`radnode.dicom_io.qc.QCLimits`)."""

    min_slices: int = Field(default=20, ge=1)
    max_slice_thickness_mm: float = Field(default=5.0, gt=0)
    spacing_tolerance_mm: float = Field(default=0.05, gt=0)
    max_tilt_deg: float = Field(default=0.5, ge=0, lt=90)
    orientation_tolerance: float = Field(default=1e-3, gt=0)


class RuleMatch(_Section):
    """Conditions of a routing rule; all given conditions must hold."""

    modality: list[str] | None = None
    body_part: str | None = Field(default=None, description="Regex on BodyPartExamined.")
    series_description: str | None = Field(default=None, description="Regex on SeriesDescription.")
    image_type_contains: str | None = None
    slice_thickness_min: float | None = Field(default=None, ge=0)
    slice_thickness_max: float | None = Field(default=None, ge=0)
    min_instances: int | None = Field(default=None, ge=1)
    calling_ae: list[str] | None = None
    station_name: str | None = Field(default=None, description="Regex on StationName.")
    study_date_from: date | None = None
    study_date_to: date | None = None

    @field_validator("body_part", "series_description", "station_name")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
        return value


class RoutingRule(_Section):
    """One routing rule; rules are evaluated in order and the first match wins."""

    name: str = Field(min_length=1)
    match: RuleMatch = Field(default_factory=RuleMatch)
    action: Literal["process", "forward", "ignore"]
    profile: str = "default"
    destinations: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _forward_needs_destination(self) -> RoutingRule:
        if self.action == "forward" and not self.destinations:
            raise ValueError(f"rule {self.name!r}: action 'forward' needs destinations")
        return self


def _default_rules() -> list[RoutingRule]:
    return [
        RoutingRule(
            name="chest-ct",
            match=RuleMatch(modality=["CT"], min_instances=20),
            action="process",
        )
    ]


class DicomWebAuth(_Section):
    """Credentials for a DICOMweb peer: a bearer token, or user and password (HTTP Basic)."""

    token: str | None = None
    username: str | None = None
    password: str | None = None
    verify_tls: bool | Path = Field(
        default=True, description="Check the peer's certificate (true), against this CA bundle (a path), or not (false)."
    )

    @model_validator(mode="after")
    def _one_scheme(self) -> DicomWebAuth:
        if self.token and (self.username or self.password):
            raise ValueError("auth: give either token or username/password, not both")
        if bool(self.username) != bool(self.password):
            raise ValueError("auth: username and password go together")
        return self


def _check_peer_address(
    what: str, kind: str, ae_title: str | None, host: str | None, port: int | None, url: str | None
) -> None:
    """A DIMSE peer needs ae_title, host and port; a DICOMweb peer an http(s) URL."""
    if kind == "dimse":
        missing = [k for k, v in (("ae_title", ae_title), ("host", host), ("port", port)) if v is None]
        if missing:
            raise ValueError(f"{what}: a DIMSE peer needs {', '.join(missing)}")
    elif not url or not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"{what}: a DICOMweb peer needs url (http:// or https://), got {url!r}")


class Destination(_Section):
    """A DICOM peer that receives results (an archive, a planning system): by C-STORE
    (``type: dimse``: ae_title, host, port) or by STOW-RS (``type: dicomweb``: url, auth)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: AETitle | None = None
    host: str | None = None
    port: Port | None = None
    url: str | None = Field(default=None, description="DICOMweb service root (type dicomweb), e.g. https://pacs/dicom-web.")
    auth: DicomWebAuth = Field(default_factory=lambda: DicomWebAuth())
    objects: list[ResultObject] = Field(
        default_factory=lambda: [ResultObject.SEG, ResultObject.RTSTRUCT, ResultObject.SR]
    )
    tls: bool = False
    uncertain_contour: UncertainContourPolicy = Field(
        default=UncertainContourPolicy.SEND,
        description="send (flagged), hold (wait for radnode jobs release) or skip_tumour (lungs only) "
        "when the tumour contour's quality score is below its model's threshold",
    )
    requires_approval: bool = Field(
        default=False,
        description="Objects wait in the outbox (awaiting_review) until a reviewer approves them in the dashboard; "
        "the RTSTRUCT sent is then a new, approved instance (e.g. for a planning system).",
    )

    @model_validator(mode="after")
    def _address_of_its_type(self) -> Destination:
        _check_peer_address(f"destination {self.name!r}", self.type, self.ae_title, self.host, self.port, self.url)
        return self


class PACSSettings(_Section):
    """The archive radnode queries and retrieves from (nightly sweep): C-FIND and C-MOVE/C-GET
    (``protocol: dimse``), or QIDO-RS and WADO-RS (``protocol: dicomweb``: url, auth)."""

    protocol: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: AETitle = Field(description="The archive's AE title; with dicomweb only its name in routing and audit.")
    host: str | None = None
    port: Port | None = None
    retrieve: Literal["move", "get"] = "move"
    url: str | None = Field(default=None, description="DICOMweb service root (protocol dicomweb).")
    auth: DicomWebAuth = Field(default_factory=lambda: DicomWebAuth())

    @model_validator(mode="after")
    def _address_of_its_protocol(self) -> PACSSettings:
        _check_peer_address("pacs", self.protocol, self.ae_title, self.host, self.port, self.url)
        return self


class SweepSettings(_Section):
    """The nightly sweep for series that were never processed."""

    enabled: bool = False
    cron: str = Field(default="0 1 * * *", description="Crontab expression (minute hour dom month dow).")
    window_start: time = time(1, 0)
    window_end: time = time(6, 0)
    lookback_days: int = Field(default=7, ge=1)
    max_series_per_run: int = Field(default=200, ge=1)
    max_concurrent_retrievals: int = Field(default=2, ge=1, le=16)

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(
                f"{value!r} is not a 5-field crontab expression (minute hour day month weekday)"
            )
        return value


def _sha256_hex(value: str) -> str:
    value = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("must be a SHA-256 digest: 64 hex digits")
    return value


#: A SHA-256 digest as 64 lower-case hex digits (upper case is accepted and lowered).
Sha256 = Annotated[str, AfterValidator(_sha256_hex)]


#: radnode regions an external model's labels may fill (``models.label_map`` keys).
ExternalRegion = Literal["tumour", "lung_right", "lung_left"]


def _label_values(value: object) -> object:
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


class NnUNetSettings(_Section):
    """How an nnU-Net v2 trained-model folder is run (``models.segmentation_format: nnunetv2``)."""

    folds: list[int | Literal["all"]] | None = Field(
        default=None, description="Folds to ensemble; null = every fold_N folder holding the checkpoint."
    )
    checkpoint: str = Field(default="checkpoint_final.pth", pattern=r"^[A-Za-z0-9_.-]+\.pth$")
    orientation: str | None = Field(
        default=None,
        pattern=r"^(?i:[LR][PA][SI]|[LR][SI][PA]|[PA][LR][SI]|[PA][SI][LR]|[SI][LR][PA]|[SI][PA][LR])$",
        description="Voxel orientation the model was trained on (DICOM letters, e.g. LPS, RAS); "
        "null = from plans.json (RAS for NibabelIOWithReorient, else LPS as SimpleITK reads DICOM).",
    )
    tile_step_size: float = Field(default=0.5, gt=0, le=1)
    mirroring: bool = Field(default=True, description="Test-time mirroring (nnU-Net's default; 8x the work).")


class ModelSettings(_Section):
    """Which model bundles run, and where."""

    segmentation_bundle: Literal["demo", "none"] | Path | None = Field(
        default="demo",
        description="Segmentation bundle directory or zip (or an nnU-Net v2 trained-model folder or MONAI "
        "bundle, see segmentation_format); 'demo' = the bundled DEMO model "
        "(not for clinical use), 'none' (or null) = lungs only, no tumour model.",
    )
    classifier_bundles: dict[str, Path] = Field(
        default_factory=lambda: {"EGFR": DEMO_CLASSIFIER_BUNDLE},
        description="Endpoint name (e.g. EGFR) -> classifier bundle folder. Default: the shipped DEMO "
        "EGFR bundle (radnode/models/classifiers/demo/egfr-demo), trained on synthetic phantoms with a "
        "planted label, flagged demo in result.json and the SR ('demo - not for clinical use'); "
        "set {} to run no classifier.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    segmentation_sha256: Sha256 | None = Field(
        default=None,
        description="Pin: expected SHA-256 of the segmentation bundle's weights file. A bundle whose "
        "weights differ is refused, even when its bundle.json was changed to match.",
    )
    classifier_sha256: dict[str, Sha256] = Field(
        default_factory=dict,
        description="Pins: endpoint -> expected SHA-256 of that classifier bundle's model file "
        "(as segmentation_sha256).",
    )

    @model_validator(mode="after")
    def _pins_name_configured_bundles(self) -> ModelSettings:
        unknown = sorted(set(self.classifier_sha256) - set(self.classifier_bundles))
        if unknown:
            raise ValueError(f"classifier_sha256 pins endpoints with no classifier bundle: {', '.join(unknown)}")
        if self.segmentation_sha256 is not None and self.segmentation_bundle in (None, "none"):
            raise ValueError("segmentation_sha256 is set but segmentation_bundle is none")
        return self

    segmentation_format: Literal["auto", "radnode", "nnunetv2", "monai"] = Field(
        default="auto",
        description="Kind of segmentation_bundle: a radnode bundle, an nnU-Net v2 trained-model folder or a "
        "MONAI bundle; auto = from the folder's content.",
    )
    label_map: dict[ExternalRegion, Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="For nnU-Net / MONAI models: radnode region -> the model's label value(s), e.g. "
        "{tumour: 1, lung_right: 2, lung_left: 3}; tumour is required. Lung labels, when given, replace "
        "radnode's classical lung mask.",
    )
    nnunet: NnUNetSettings = Field(default_factory=NnUNetSettings)

    @field_validator("label_map", mode="before")
    @classmethod
    def _single_values(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: _label_values(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _external_model(self) -> ModelSettings:
        if self.label_map:
            if "tumour" not in self.label_map:
                raise ValueError("models.label_map must map 'tumour' to the model's tumour label value(s)")
            owners: dict[int, str] = {}
            for region, values in self.label_map.items():
                for value in values:
                    if value in owners and owners[value] != region:
                        raise ValueError(
                            f"models.label_map: label {value} is given to both {owners[value]} and {region}"
                        )
                    owners[value] = region
        external = self.segmentation_format in ("nnunetv2", "monai")
        if external and not isinstance(self.segmentation_bundle, Path):
            raise ValueError(
                f"models.segmentation_format {self.segmentation_format!r} needs segmentation_bundle to be the "
                f"model's folder, not {self.segmentation_bundle!r}"
            )
        if external and not self.label_map:
            raise ValueError(
                f"models.segmentation_format {self.segmentation_format!r} needs models.label_map "
                "(radnode region -> the model's label value, e.g. {tumour: 1})"
            )
        if self.label_map and not isinstance(self.segmentation_bundle, Path):
            raise ValueError(
                f"models.label_map applies to an nnU-Net / MONAI model folder, not to segmentation_bundle "
                f"{self.segmentation_bundle!r}"
            )
        if self.segmentation_format == "radnode" and self.label_map:
            raise ValueError("models.label_map applies to nnU-Net / MONAI models; a radnode bundle has its own output")
        return self


def _default_sr_features() -> list[str]:
    return [
        "original_firstorder_Mean",
        "original_firstorder_Entropy",
        "original_firstorder_Kurtosis",
        "original_shape_SurfaceVolumeRatio",
        "original_shape_Maximum3DDiameter",
        "original_glcm_JointEntropy",
        "original_glcm_Contrast",
        "original_glrlm_RunLengthNonUniformity",
        "original_glszm_ZoneEntropy",
        "original_ngtdm_Coarseness",
    ]


class RadiomicsSettings(_Section):
    """Three-region radiomics (pyradiomics profiles shipped in radnode.models.radiomics)."""

    enabled: bool = True
    parallel: bool = Field(default=True, description="Regions in parallel processes (values identical to serial).")
    profiles: dict[Literal["tumour", "ring", "lung"], str] = Field(
        default_factory=lambda: {"tumour": "tumour-v1", "ring": "ring-v1", "lung": "lung-v1"},
        description="Region -> shipped profile name or a YAML parameter file.",
    )
    ring_width_mm: float = Field(default=3.0, gt=0, le=20)
    sr_features: list[str] = Field(
        default_factory=_default_sr_features,
        description="Tumour and ring features reported in the SR (all features go to result.json).",
    )


class OutputSettings(_Section):
    """How result objects are identified (PS3.5 §9 UIDs, series numbering)."""

    uid_root: str = Field(
        default="2.25",
        pattern=UID_ROOT_PATTERN,
        max_length=24,
        description="Root for derived UIDs; 2.25 gives UUID-derived UIDs (PS3.5 §B.2).",
    )
    seg_series_number: int = Field(default=9101, ge=1)
    rtstruct_series_number: int = Field(default=9102, ge=1)
    sr_series_number: int = Field(default=9103, ge=1)
    series_description_prefix: str = Field(default="radnode", max_length=40)


class PipelineSettings(_Section):
    """Workers that run the processing chain."""

    workers: int = Field(default=1, ge=0, le=16, description="Concurrent jobs (one per GPU); 0 = only remote `radnode worker`s.")
    job_timeout_seconds: float = Field(default=1800.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)


class DatabaseSettings(_Section):
    """Where the shared state lives: unset = the embedded SQLite files in ``storage.data_dir``.

    A ``postgresql://`` URL moves the job queue (and what remote workers need), the series
    index and a copy of the audit trail into PostgreSQL, so ``radnode worker`` processes on
    other machines can share the work and node roles in several processes share one index.
    TLS to the server is part of the URL (``?sslmode=verify-full&sslrootcert=…``).
    """

    url: str | None = Field(
        default=None,
        description="postgresql://user@host:5432/radnode?sslmode=verify-full; unset = SQLite in data_dir.",
    )
    profile_queues: dict[str, str] = Field(
        default_factory=dict,
        description="Processing profile -> worker queue (e.g. {tumour: gpu}); others go to default_queue.",
    )
    default_queue: str = Field(default="cpu", pattern=r"^[A-Za-z0-9_.-]+$")
    node_host: str | None = Field(
        default=None, description="Address workers C-GET series from (default: node.host, or this machine's name)."
    )
    lease_seconds: float = Field(
        default=60.0, ge=5, description="A job of a dead worker is re-queued at most this long (+ one recovery round) after its last heartbeat."
    )

    @field_validator("url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("database.url must be a postgresql:// URL (unset means the embedded SQLite files)")
        return value


class MetricsSettings(_Section):
    """Prometheus metrics and /healthz over HTTP."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9110


DashboardRole = Literal["viewer", "operator", "reviewer"]


class DashboardSettings(_Section):
    """The web dashboard (radnode/web), served by ``radnode serve``; loopback unless told otherwise."""

    enabled: bool = True
    host: str = Field(default="127.0.0.1", description="Bind address; elsewhere without TLS warns at start.")
    port: Port = 8110
    tls: TLSSettings = Field(default_factory=TLSSettings)
    phi_roles: list[DashboardRole] = Field(
        default_factory=lambda: ["operator", "reviewer"],
        description="Roles shown patient-identifying fields; others see them redacted.",
    )
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    proxy_user_header: str | None = Field(
        default=None, description="Header naming the logged-in user, set by a trusted reverse proxy (e.g. X-Remote-User)."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="Client addresses whose proxy_user_header is believed; nobody else's."
    )


class ReviewSettings(_Section):
    """Who is told that results await review (destinations with ``requires_approval``); no PHI is sent."""

    webhook_url: str | None = Field(default=None, description="POSTed JSON: job id, series UID, destinations.")
    smtp_host: str | None = Field(default=None, description="Mail server for the e-mail notice (plain SMTP, STARTTLS if offered).")
    smtp_port: Port = 25
    mail_from: str = "radnode@localhost"
    mail_to: list[str] = Field(default_factory=list)
    dashboard_url: str | None = Field(default=None, description="Base URL put in notices (e.g. https://radnode.hospital/).")
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)


class DicomWebSettings(_Section):
    """DICOMweb STOW-RS receiver (``POST /dicomweb/studies``) served by ``radnode serve``.

    Off by default: ``make run`` opens no extra port, and with no tokens every request is refused anyway.
    """

    enabled: bool = False
    host: str = Field(default="127.0.0.1", description="Bind address; elsewhere without TLS warns at start.")
    port: Port = 8112
    tls: TLSSettings = Field(default_factory=TLSSettings)
    tokens: dict[AETitle, Annotated[str, Field(min_length=16)]] = Field(
        default_factory=dict,
        description="Client name -> bearer token. The name is the caller's identity (calling AE title in "
        "routing rules, access rules and audit); empty = every request refused (401).",
    )
    max_request_mb: int = Field(
        default=1024, ge=1, le=1_000_000, description="Largest STOW-RS request body; larger ones get 413 unread."
    )


class ClinicalContourSettings(_Section):
    """A clinician's RTSTRUCT for the same CT: its GTV drives radiomics and predictions,
    and radnode's own tumour contour is compared with it (agreement per model)."""

    enabled: bool = True
    gtv_names: list[str] = Field(
        default_factory=lambda: ["GTV-1", "GTVp", "GTV*"],
        min_length=1,
        description="ROI name patterns (fnmatch, case-insensitive) in order of preference; "
        "RT ROI Interpreted Type GTV is preferred among one pattern's matches.",
    )
    query_pacs: bool = Field(
        default=True, description="For a live-received CT, C-FIND the configured PACS for the study's RTSTRUCTs."
    )
    pacs_timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="Bound on that query and retrieval; it never blocks the job."
    )


class LoggingSettings(_Section):
    """Log verbosity and format."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, description="One JSON object per line (for journald/ELK).")


class Settings(BaseSettings):
    """The effective radnode configuration."""

    model_config = SettingsConfigDict(
        env_prefix="RADNODE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    series: SeriesSettings = Field(default_factory=SeriesSettings)
    qc: QCSettings = Field(default_factory=QCSettings)
    routing: list[RoutingRule] = Field(default_factory=_default_rules)
    destinations: list[Destination] = Field(default_factory=list)
    pacs: PACSSettings | None = None
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    radiomics: RadiomicsSettings = Field(default_factory=RadiomicsSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    dicomweb: DicomWebSettings = Field(default_factory=DicomWebSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    clinical_contours: ClinicalContourSettings = Field(default_factory=ClinicalContourSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment must win over it so an
        # operator can override one key of a deployed file (RADNODE_NODE__PORT=11113).
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(duplicates)}")
        for rule in self.routing:
            unknown = [d for d in rule.destinations if d not in names]
            if unknown:
                raise ValueError(
                    f"routing rule {rule.name!r} names unknown destinations {unknown}; "
                    f"configured: {names or 'none'}"
                )
        if self.pipeline.workers == 0 and self.database.url is None:
            raise ValueError("pipeline.workers: 0 needs database.url (remote `radnode worker`s); with SQLite nothing would process")
        if self.sweep.enabled and self.pacs is None:
            raise ValueError("sweep.enabled needs a pacs section to query")
        return self

    def destination(self, name: str) -> Destination:
        """Return the destination called ``name`` or raise ``KeyError`` naming the known ones."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(f"no destination {name!r}; configured: {[d.name for d in self.destinations]}")
