"""Model bundles: save/load round trips and the messages of every refusal."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from radnode.models.bundle import BUNDLE_FILE, BundleError, load_bundle, read_bundle_meta, save_bundle
from radnode.models.preprocess import PreprocessParams
from radnode.models.raseg import RASeg, RASegConfig

TINY = RASegConfig(channels=(4, 8, 16, 32), convlstm_layers=1)
META = {
    "name": "raseg-test",
    "version": "0.0.1",
    "training_data": "one synthetic sphere",
    "metrics": {"dice": 0.5},
    "intended_use": "unit tests only",
    "demo": True,
}


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture()
def model() -> RASeg:
    return RASeg(TINY).eval()


def _outputs(model: RASeg) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(1, 1, 8, 8, 8, generator=gen)
    with torch.no_grad():
        return model.eval()(image, (image > 0).float())


def _edit_json(bundle: Path, edit) -> None:
    path = bundle / BUNDLE_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_directory_bundle_round_trip(tmp_path: Path, model: RASeg) -> None:
    params = PreprocessParams(lung_margin_mm=7.0)
    path = save_bundle(model, tmp_path / "b", preprocessing=params, inference={"overlap": 0.5}, **META)
    assert (path / "weights.safetensors").is_file()
    bundle = load_bundle(path)
    assert bundle.meta.name == META["name"] and bundle.meta.demo is True
    assert bundle.meta.architecture == TINY and bundle.meta.preprocessing == params
    assert bundle.inference_settings(num_threads=1).overlap == 0.5
    assert torch.equal(_outputs(bundle.model), _outputs(model))


def test_zip_bundles_with_torch_weights_and_one_folder_deep(tmp_path: Path, model: RASeg) -> None:
    path = save_bundle(model, tmp_path / "b.zip", weights_format="torch", **META)
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == [BUNDLE_FILE, "weights.pt"]
    assert torch.equal(_outputs(load_bundle(path).model), _outputs(model))
    # A zip made by zipping the bundle folder itself (one folder deep) loads too.
    folder = save_bundle(model, tmp_path / "raseg", **META)
    nested = Path(shutil.make_archive(str(tmp_path / "nested"), "zip", tmp_path, "raseg"))
    assert read_bundle_meta(nested).weights_file == "weights.safetensors"
    assert torch.equal(_outputs(load_bundle(nested).model), _outputs(model))
    assert folder.is_dir()


def test_checksum_failure_names_file_and_field(tmp_path: Path, model: RASeg) -> None:
    path = save_bundle(model, tmp_path / "b", **META)
    weights = path / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # one flipped bit in the last tensor's data
    weights.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match=r"weights\.safetensors.*'weights\.sha256'"):
        load_bundle(path)


def test_checksum_failure_in_a_zip(tmp_path: Path, model: RASeg) -> None:
    good = save_bundle(model, tmp_path / "good", **META)
    other = save_bundle(RASeg(TINY), tmp_path / "other", **META)  # other random weights
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.write(good / BUNDLE_FILE, BUNDLE_FILE)
        archive.write(other / "weights.safetensors", "weights.safetensors")
    with pytest.raises(BundleError, match=r"bad\.zip!weights\.safetensors.*SHA-256"):
        load_bundle(bad)


def test_architecture_mismatch_is_reported(tmp_path: Path, model: RASeg) -> None:
    path = save_bundle(model, tmp_path / "b", **META)

    def widen(data: dict) -> None:
        data["architecture"]["channels"] = [8, 8, 16, 32]

    _edit_json(path, widen)
    expected = r"'architecture'.*channels \[8, 8, 16, 32\].*other shapes.*file \(4,\) vs architecture \(8,\)"
    with pytest.raises(BundleError, match=expected):
        load_bundle(path)

    def drop_lstm(data: dict) -> None:
        data["architecture"]["channels"] = list(TINY.channels)
        data["architecture"]["convlstm_layers"] = 0

    _edit_json(path, drop_lstm)
    with pytest.raises(BundleError, match=r"unexpected.*recurrent\.cells"):
        load_bundle(path)

    _edit_json(path, lambda d: d["architecture"].update(kernel_sise=3))
    with pytest.raises(BundleError, match=r"field 'architecture'.*kernel_sise"):
        load_bundle(path)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.pop("intended_use"), "'intended_use' is missing"),
        (lambda d: d.pop("metrics"), "'metrics' is missing"),
        (lambda d: d.update(demo="yes"), "'demo' must be true or false"),
        (lambda d: d["weights"].pop("sha256"), "'weights.sha256' is missing"),
        (lambda d: d["weights"].update(file="../weights.pt"), "'weights.file' must be a plain file name"),
        (lambda d: d["weights"].update(file="weights.bin"), "'weights.file' must end in"),
        (lambda d: d["preprocessing"].update(hu_min=500), "'preprocessing' is invalid"),
        (lambda d: d.update(format_version=99), "'format_version' is 99"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, model: RASeg, edit, field: str) -> None:
    path = save_bundle(model, tmp_path / "b", **META)
    _edit_json(path, edit)
    with pytest.raises(BundleError, match=f"bundle.json: field {field}"):
        load_bundle(path)


def test_missing_things_are_named(tmp_path: Path, model: RASeg) -> None:
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "nowhere")
    path = save_bundle(model, tmp_path / "b", **META)
    (path / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match=r"weights\.safetensors: file missing"):
        load_bundle(path)
    (path / BUNDLE_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(path)
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(model, path, **META)


def test_a_pinned_hash_refuses_weights_replaced_together_with_their_hash(tmp_path: Path, model: RASeg) -> None:
    """bundle.json's hash guards against damage; the pin in the settings against replacement."""
    from radnode.models.bundle import sha256_hex, verify_bundle

    good = save_bundle(model, tmp_path / "good", **META)
    pin = sha256_hex((good / "weights.safetensors").read_bytes())
    assert verify_bundle(good, pin).name == META["name"]
    assert torch.equal(_outputs(load_bundle(good, expected_sha256=pin.upper()).model), _outputs(model))
    # Someone replaces the whole bundle (weights and the JSON hash beside them): self-consistent.
    shutil.rmtree(good)
    save_bundle(RASeg(TINY), good, **META)
    load_bundle(good)  # loads without a pin...
    for check in (lambda: verify_bundle(good, pin), lambda: load_bundle(good, expected_sha256=pin)):
        with pytest.raises(BundleError, match=r"weights\.safetensors.*not the pinned .*models\.segmentation_sha256"):
            check()
