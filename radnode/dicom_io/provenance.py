"""Which algorithms made an object: the IHE AIR Contributing Equipment items and Device UIDs.

IHE AI Results (AIR, RAD TF Supplement, Rev 1.1) asks every result object to name each
algorithm that contributed to it in the Contributing Equipment Sequence (0018,A001) of
the SOP Common module (PS3.3 C.12.1), one item per algorithm, with

* Purpose of Reference Code Sequence (0040,A170) = (Newcode1, 99IHE, "Processing
  Algorithm") -- :data:`PROCESSING_ALGORITHM`;
* Manufacturer (0008,0070), Manufacturer's Model Name (0008,1090) = the algorithm's
  name, Software Versions (0018,1020) = its version;
* Device UID (0018,1002) that identifies *this build* of the algorithm.

radnode derives the Device UID from a SHA-256 checksum of what defines the algorithm (a
model bundle's content, a classifier's model file and metadata, an engine's name,
version and parameters): ``2.25.<UUID5 of the checksum>`` (PS3.5 §B.2). It is always
under ``2.25`` whatever ``output.uid_root`` says, so the same bundle has the same Device
UID at every site, and any change of the bundle gives a new one.

highdicom's :class:`highdicom.ContributingEquipment` accepts only DCM purposes of
reference, so :class:`AlgorithmEquipment` builds a valid item with one and then replaces
the purpose with the IHE code; the 99IHE scheme is declared in the object's Coding
Scheme Identification Sequence (PS3.3 C.12.1.1.4) through :func:`declare_coding_schemes`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from radnode.dicom_io import codes
from radnode.dicom_io.uids import UUID_ROOT, derive_uid

#: IHE's private coding scheme (PS3.16 §8.2 designators starting with "99").
IHE_SCHEME = "99IHE"
#: AIR's Purpose of Reference of an algorithm in the Contributing Equipment Sequence.
PROCESSING_ALGORITHM = Code("Newcode1", IHE_SCHEME, "Processing Algorithm")
#: Manufacturer written for radnode's own algorithms and bundles that name none.
DEFAULT_MANUFACTURER = "radnode"
#: Namespace part of every algorithm Device UID (so it never equals another derived UID).
_DEVICE_PART = "radnode-algorithm-device"
#: Longest LO value (PS3.5 §6.2) and ST value of Contribution Description.
_LO = 64
_ST = 1024


def checksum_of(*parts: Any) -> str:
    """SHA-256 (hex) of ``parts`` as canonical JSON: equal content, equal checksum.

    Mappings are key-sorted, so the order in which a bundle file lists its fields does
    not matter; any changed value does.
    """
    text = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def algorithm_device_uid(checksum: str) -> str:
    """Device UID (0018,1002) of the algorithm build whose checksum is ``checksum``."""
    checksum = checksum.strip().lower()
    if not checksum:
        raise ValueError("an algorithm's Device UID needs a non-empty checksum")
    return derive_uid(UUID_ROOT, _DEVICE_PART, checksum)


@dataclass(frozen=True)
class ContributingAlgorithm:
    """One algorithm that contributed to a result object.

    Attributes
    ----------
    name
        Manufacturer's Model Name (LO): the bundle or method name, e.g. ``raseg-demo``.
    version
        Software Versions: the bundle or method version.
    checksum
        SHA-256 hex of what defines this build (see :func:`checksum_of`); the Device UID
        is derived from it.
    role
        What it did, for Contribution Description, e.g. "tumour segmentation".
    manufacturer
        Who made it.
    demo
        A demo model: the description says "demo — not for clinical use".
    """

    name: str
    version: str
    checksum: str
    role: str
    manufacturer: str = DEFAULT_MANUFACTURER
    demo: bool = False

    def __post_init__(self) -> None:
        for field_name in ("name", "version", "checksum", "manufacturer"):
            if not str(getattr(self, field_name)).strip():
                raise ValueError(f"contributing algorithm {self.name!r}: {field_name} must not be empty")

    @property
    def device_uid(self) -> str:
        """Device UID of this build (changes whenever the checksum does)."""
        return algorithm_device_uid(self.checksum)

    @property
    def description(self) -> str:
        """Contribution Description (ST)."""
        text = f"{self.role}: {self.name} {self.version}"
        if self.demo:
            # ASCII: a SEG or RTSTRUCT keeps the source's character set (often Latin-1).
            text += f" ({codes.DEMO_TEXT.replace(chr(0x2014), '-')})"
        return text[:_ST]


class AlgorithmEquipment(hd.ContributingEquipment):
    """A Contributing Equipment item for an algorithm, as IHE AIR defines it."""

    def __init__(self, algorithm: ContributingAlgorithm, institution_name: str | None = None) -> None:
        super().__init__(
            manufacturer=algorithm.manufacturer[:_LO],
            purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,  # replaced below
            manufacturer_model_name=algorithm.name[:_LO],
            software_versions=[algorithm.version[:_LO]],
            institution_name=institution_name[:_LO] if institution_name else None,
            contribution_description=algorithm.description,
        )
        self.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(PROCESSING_ALGORITHM)]
        self.DeviceUID = algorithm.device_uid


def contributing_equipment(
    algorithms: Iterable[ContributingAlgorithm], institution_name: str | None = None
) -> list[hd.ContributingEquipment]:
    """One AIR item per distinct algorithm (same Device UID listed once), in order."""
    items: list[hd.ContributingEquipment] = []
    seen: set[str] = set()
    for algorithm in algorithms:
        if algorithm.device_uid in seen:
            continue
        seen.add(algorithm.device_uid)
        items.append(AlgorithmEquipment(algorithm, institution_name))
    return items


def ihe_coding_scheme() -> CodingSchemeIdentificationItem:
    """Coding Scheme Identification item declaring :data:`IHE_SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=IHE_SCHEME,
        name="IHE private codes",
        responsible_organization="IHE International",
    )


def declare_coding_schemes(ds: Dataset, schemes: Sequence[CodingSchemeIdentificationItem]) -> None:
    """Add scheme declarations to ``ds`` (PS3.3 C.12.1.1.4), each designator once."""
    if not schemes:
        return  # an empty sequence would break the Type 1 rule of its items
    existing = list(ds.get("CodingSchemeIdentificationSequence", []))
    known = {str(item.CodingSchemeDesignator) for item in existing}
    for scheme in schemes:
        if str(scheme.CodingSchemeDesignator) not in known:
            existing.append(scheme)
            known.add(str(scheme.CodingSchemeDesignator))
    ds.CodingSchemeIdentificationSequence = existing


def add_algorithms(ds: Dataset, algorithms: Iterable[ContributingAlgorithm],
                   institution_name: str | None = None) -> None:
    """Append AIR algorithm items to the Contributing Equipment Sequence of ``ds``.

    For objects built by hand (the RTSTRUCT); the highdicom builders take the items as
    ``contributing_equipment``. Declares the 99IHE scheme when an item was added.
    """
    items = contributing_equipment(algorithms, institution_name)
    if not items:
        return
    ds.ContributingEquipmentSequence = [*ds.get("ContributingEquipmentSequence", []), *items]
    declare_coding_schemes(ds, [ihe_coding_scheme()])


def algorithm_items(ds: Dataset) -> list[Dataset]:
    """The Contributing Equipment items of ``ds`` whose purpose is "Processing Algorithm"."""
    out = []
    for item in ds.get("ContributingEquipmentSequence", []):
        for purpose in item.get("PurposeOfReferenceCodeSequence", []):
            if (str(purpose.CodeValue), str(purpose.CodingSchemeDesignator)) == (
                PROCESSING_ALGORITHM.value, PROCESSING_ALGORITHM.scheme_designator
            ):
                out.append(item)
                break
    return out


def engine_algorithm(engine: Mapping[str, Any], profiles: Mapping[str, str] | None = None) -> ContributingAlgorithm:
    """The radiomics engine as a contributing algorithm (checksum over its settings)."""
    name = str(engine.get("name", "radiomics"))
    version = str(engine.get("version", "unknown"))
    return ContributingAlgorithm(
        name=name,
        version=version,
        checksum=checksum_of("radiomics-engine", dict(engine), dict(profiles or {})),
        role="radiomic feature extraction",
        manufacturer=str(engine.get("manufacturer", name)),
    )
