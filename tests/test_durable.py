"""One durable-write helper: file fsynced, renamed, folder fsynced; nothing half-written;
and no other copy of the sequence left in the code."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pydicom
import pytest

from radnode import durable
from radnode.pipeline.chain import save_dataset, write_json_atomically

from node_support import IBSI_SLICES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths fsynced during the test, in order (resolved through /proc/self/fd)."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def _assert_durable(target: Path, fsynced: list[str]) -> None:
    """The file's bytes were fsynced under a temporary name, then its folder, and no temporary is left."""
    folder = str(target.parent.resolve())
    temporaries = [p for p in fsynced if Path(p).parent == target.parent.resolve() and Path(p).name.startswith(f".{target.name}.")]
    assert temporaries, f"{target.name} was never fsynced before its rename: {fsynced}"
    assert folder in fsynced[fsynced.index(temporaries[-1]) :], f"{folder} not fsynced after the rename"
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_write_json_and_bytes_are_durable_and_replace_whole(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "sub" / "result.json"
    durable.write_json(target, {"status": "done"})
    assert json.loads(target.read_text()) == {"status": "done"} and target.stat().st_mode & 0o777 == 0o644
    _assert_durable(target, fsynced)
    fsynced.clear()
    durable.write_bytes(target, [b"{", b"}"], mode=0o600)
    assert target.read_bytes() == b"{}" and target.stat().st_mode & 0o777 == 0o600
    _assert_durable(target, fsynced)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk trouble"):
        with durable.replacing(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk trouble")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_copy_links_or_copies_byte_for_byte(tmp_path: Path, fsynced: list[str]) -> None:
    source = tmp_path / "in.dcm"
    source.write_bytes(os.urandom(3000))
    source.chmod(0o640)
    linked = durable.copy_file(source, tmp_path / "out" / "a.dcm", link=True)
    copied = durable.copy_file(source, tmp_path / "out" / "b.dcm")
    assert linked.read_bytes() == copied.read_bytes() == source.read_bytes()
    assert linked.stat().st_ino == source.stat().st_ino and source.stat().st_mode & 0o777 == 0o640
    assert copied.stat().st_ino != source.stat().st_ino and copied.stat().st_mode & 0o777 == 0o644
    _assert_durable(copied, fsynced)


def test_replace_tree_swaps_a_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    staged = tmp_path / ".staged"
    staged.mkdir()
    (staged / "weights.bin").write_bytes(b"new")
    durable.replace_tree(staged, target)
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_the_chain_saves_seg_rtstruct_sr_and_result_json_durably(
    tmp_path: Path, shared_data: Path, fsynced: list[str]
) -> None:
    # These two wrote without any fsync before the helper existed.
    ds = pydicom.dcmread(sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[0])
    saved = save_dataset(ds, tmp_path / "SEG.dcm")
    assert pydicom.dcmread(saved).SOPInstanceUID == ds.SOPInstanceUID
    _assert_durable(saved, fsynced)
    fsynced.clear()
    write_json_atomically(tmp_path / "result.json", {"status": "done"})
    _assert_durable(tmp_path / "result.json", fsynced)


def test_no_other_copy_of_the_rename_sequence_is_left() -> None:
    """Only radnode.durable (and the listener's streaming TemporaryFile) rename files into place."""
    allowed = {REPO / "radnode" / "durable.py", REPO / "radnode" / "node" / "storage.py"}
    pattern = re.compile(r"\bos\.(replace|rename)\(|mkstemp\(|\b(tmp|temp|scratch|staging|staged)\w*\.(rename|replace)\(")
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for folder in ("radnode", "benchmarks")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path not in allowed
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
