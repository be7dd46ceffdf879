"""Contributing algorithms and their Device UIDs (IHE AIR provenance), without running the chain."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import pydicom
import pytest

from radnode.dicom_io import codes
from radnode.dicom_io.provenance import (
    IHE_SCHEME,
    PROCESSING_ALGORITHM,
    AlgorithmEquipment,
    ContributingAlgorithm,
    add_algorithms,
    algorithm_device_uid,
    algorithm_items,
    checksum_of,
    contributing_equipment,
    declare_coding_schemes,
    ihe_coding_scheme,
)
from radnode.dicom_io.regions import AlgorithmInfo, Prediction
from radnode.dicom_io.uids import UUID_ROOT, is_valid_uid
from radnode.models.bundle import read_bundle_meta
from radnode.models.tumour import DEMO_BUNDLE_PATH


def _algorithm(checksum: str, **kw: object) -> ContributingAlgorithm:
    return ContributingAlgorithm(name="raseg-test", version="1.0", checksum=checksum, role="tumour segmentation", **kw)


def test_device_uid_is_a_function_of_the_checksum_only() -> None:
    a, b = checksum_of("bundle", {"x": 1, "y": 2}), checksum_of("bundle", {"y": 2, "x": 1})
    assert a == b  # key order does not matter
    c = checksum_of("bundle", {"x": 1, "y": 3})
    assert algorithm_device_uid(a) == algorithm_device_uid(a.upper())
    assert algorithm_device_uid(a) != algorithm_device_uid(c)
    uid = _algorithm(a).device_uid
    assert is_valid_uid(uid) and uid.startswith(f"{UUID_ROOT}.")
    # name and version do not enter: a retrained bundle under the same name is told apart
    assert _algorithm(a).device_uid == dataclasses.replace(_algorithm(a), name="other").device_uid


def test_empty_checksum_is_refused() -> None:
    with pytest.raises(ValueError, match="checksum"):
        _algorithm("  ")
    with pytest.raises(ValueError, match="checksum"):
        algorithm_device_uid("")


def test_air_item_has_the_ihe_purpose_and_the_device_uid() -> None:
    algorithm = _algorithm("ab" * 32, demo=True, manufacturer="Example Lab")
    item = AlgorithmEquipment(algorithm, institution_name="General Hospital")
    assert isinstance(item, hd.ContributingEquipment)
    [purpose] = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1", "99IHE", "Processing Algorithm"
    )
    assert item.Manufacturer == "Example Lab" and item.ManufacturerModelName == "raseg-test"
    assert item.SoftwareVersions == "1.0" and item.DeviceUID == algorithm.device_uid
    assert item.InstitutionName == "General Hospital"
    # ASCII description: SEG/RTSTRUCT keep the source's (often Latin-1) character set
    assert item.ContributionDescription.isascii() and "not for clinical use" in item.ContributionDescription


def test_one_item_per_distinct_algorithm() -> None:
    first, second = _algorithm("aa" * 32), _algorithm("bb" * 32)
    items = contributing_equipment([first, second, first])
    assert [i.DeviceUID for i in items] == [first.device_uid, second.device_uid]


def test_add_algorithms_to_a_hand_built_object_declares_99ihe() -> None:
    ds = pydicom.Dataset()
    add_algorithms(ds, [])
    assert "ContributingEquipmentSequence" not in ds and "CodingSchemeIdentificationSequence" not in ds
    add_algorithms(ds, [_algorithm("cc" * 32)])
    [item] = algorithm_items(ds)
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM.value
    declare_coding_schemes(ds, [ihe_coding_scheme(), codes.radnode_coding_scheme()])
    declared = [str(i.CodingSchemeDesignator) for i in ds.CodingSchemeIdentificationSequence]
    assert declared == [IHE_SCHEME, codes.RADNODE_SCHEME]


def test_bundle_checksum_follows_its_content() -> None:
    meta = read_bundle_meta(DEMO_BUNDLE_PATH)
    assert meta.checksum == read_bundle_meta(DEMO_BUNDLE_PATH).checksum
    other_weights = dataclasses.replace(meta, weights_sha256="0" * 64)
    other_preprocessing = dataclasses.replace(meta, inference={**meta.inference, "overlap": 0.5})
    assert len({meta.checksum, other_weights.checksum, other_preprocessing.checksum}) == 3


def test_a_changed_bundle_gives_other_object_uids() -> None:
    before = AlgorithmInfo(model_versions={"raseg-test": "1.0"}, contributors=(_algorithm("aa" * 32),))
    after = AlgorithmInfo(model_versions={"raseg-test": "1.0"}, contributors=(_algorithm("bb" * 32),))
    assert before.identity() != after.identity()


def test_prediction_class_at_threshold() -> None:
    common = dict(endpoint="EGFR", classifier_name="c", classifier_version="1", training_cohort="t",
                  negative_class="wild-type", positive_class="mutant", threshold=0.6)
    assert Prediction(probability=0.6, **common).predicted_class == "mutant"
    assert Prediction(probability=0.59, **common).predicted_class == "wild-type"
    with pytest.raises(ValueError, match="threshold"):
        Prediction(probability=0.5, **{**common, "threshold": 1.0})
