"""Damaged caches: a truncated or missing array, a broken meta.json, a truncated split file, the temporary folder
of a killed decode are detected and rebuilt (the rebuilt cache equals a fresh one); what cannot be rebuilt (a
cache folder that cannot be written, a full disk, a file damaged under a running client) is one DataError
paragraph naming the file. Every test uses its own temporary cache folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import fedlt.data.sources as sources
from fedlt.data.federated import FederatedSplit
from fedlt.data.sources import DataError, load_source, open_cached_source
from tests.conftest import ROOT

SYNTH = {"name": "synthetic_lt", "source": "synthetic", "num_classes": 4, "train_per_class": 12,
         "test_per_class": 3, "image_size": 6, "channels": 3, "mean": None, "std": None}


def load(cache: Path):
    return load_source(dict(SYNTH), None, cache)


def same_arrays(a, b) -> bool:
    return (a.classes == b.classes and a.mean == b.mean and a.std == b.std
            and all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ("train_x", "train_y", "test_x", "test_y")))


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


DAMAGE = {
    "truncated-npy": lambda d: truncate(d / "train_x.npy"),
    "truncated-npy-header": lambda d: truncate(d / "test_y.npy", keep=20),
    "missing-npy": lambda d: (d / "test_x.npy").unlink(),
    "missing-meta": lambda d: (d / "meta.json").unlink(),
    "garbage-meta": lambda d: (d / "meta.json").write_text("{not json"),
    "extra-bytes": lambda d: (d / "train_y.npy").write_bytes((d / "train_y.npy").read_bytes() + b"\0" * 8),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_source_cache_is_decoded_again(tmp_path, caplog, damage):
    fresh = load(tmp_path / "fresh")
    cache = tmp_path / "cache"
    folder = Path(load(cache).cache_dir)
    DAMAGE[damage](folder)
    with caplog.at_level(logging.WARNING, logger="fedlt"):
        again = load(cache)
    assert same_arrays(again, fresh)
    assert Path(again.cache_dir) == folder
    assert f"the decoded data in {folder} is damaged" in caplog.text and "decoding it again" in caplog.text
    assert hidden(cache / "sources") == []  # no lock file, no temporary folder left behind
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in Path(fresh.cache_dir).iterdir())


def test_an_intact_cache_is_not_decoded_again(tmp_path, monkeypatch):
    load(tmp_path / "cache")

    def boom(**_):
        raise AssertionError("decoded again")

    monkeypatch.setattr("fedlt.data.synthetic.generate", boom)
    load(tmp_path / "cache")


KILLED_DECODE = """
import sys, time
from pathlib import Path
import fedlt.data.synthetic as synthetic
from fedlt.data.sources import load_source

def stuck(**_):
    Path(sys.argv[2]).write_text("decoding")
    time.sleep(600)

synthetic.generate = stuck
load_source({cfg}, None, Path(sys.argv[1]))
"""


def test_the_temporary_folder_of_a_killed_decode_is_removed(tmp_path, caplog):
    cache, marker = tmp_path / "cache", tmp_path / "decoding"
    script = textwrap.dedent(KILLED_DECODE).format(cfg=repr(SYNTH))
    proc = subprocess.Popen([sys.executable, "-c", script, str(cache), str(marker)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a bound on waiting, not a timing assertion
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate()[1] if proc.poll() is not None else "the decode never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    left = hidden(cache / "sources")
    assert any(".tmp-" in n for n in left), left  # what a killed decode leaves: its temporary folder
    with caplog.at_level(logging.WARNING, logger="fedlt"):
        again = load(cache)
    assert same_arrays(again, load(tmp_path / "fresh"))
    assert "left in" in caplog.text and "by an interrupted fedlt process" in caplog.text
    assert hidden(cache / "sources") == []


def test_temporary_folders_of_older_versions_are_removed_once_old(tmp_path):
    cache = tmp_path / "cache"
    key = Path(load(cache).cache_dir).name
    old, recent = cache / "sources" / f".{key}-abcd1234", cache / "sources" / f".{key}-wxyz5678"
    for d in (old, recent):
        d.mkdir()
        (d / "train_x.npy").write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * sources.OLD_TEMP_AGE_S,) * 2)
    (Path(load(cache).cache_dir) / "meta.json").unlink()  # a rebuild looks for leftovers
    load(cache)
    assert hidden(cache / "sources") == [recent.name]  # a recent one may belong to a running older fedlt


def _refuse_writes_under(monkeypatch, folder: Path) -> None:
    """What a read-only folder does to a process that is not root (root may write anywhere)."""
    real_mkdir, real_open = os.mkdir, os.open

    def inside(path) -> bool:
        return str(Path(path).absolute()).startswith(str(folder))

    def mkdir(path, *a, **k):
        if inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)

    def open_(path, flags, *a, **k):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


def make_read_only(monkeypatch, folder: Path) -> None:
    if os.geteuid() == 0:
        _refuse_writes_under(monkeypatch, folder)
    else:
        for p in [folder, *folder.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)


def test_a_read_only_cache_dir_is_one_paragraph(tmp_path, monkeypatch):
    cache = tmp_path / "ro"
    cache.mkdir()
    make_read_only(monkeypatch, cache)
    with pytest.raises(DataError) as e:
        load(cache)
    msg = str(e.value)
    assert f"{cache / 'sources'} is not writable" in msg and "cache_dir=PATH" in msg and "FEDLT_CACHE_DIR" in msg
    assert "\n" not in msg


def test_a_complete_read_only_cache_is_used(tmp_path, monkeypatch):
    cache = tmp_path / "shared"
    fresh = load(cache)
    make_read_only(monkeypatch, cache)
    assert same_arrays(load(cache), fresh)  # nothing needs writing, so nothing is refused


def test_a_cache_dir_that_is_a_file_and_a_full_disk(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=f"^{tmp_path / 'file'} is a file where fedlt needs a folder .*cache_dir=PATH"):
        load(tmp_path / "file")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(DataError, match=r"the device holding .* is full \(nothing half-written was kept\)"):
        load(tmp_path / "cache")
    assert hidden(tmp_path / "cache" / "sources") == []


def test_a_client_opening_a_damaged_cache_is_told_what_to_delete(tmp_path):
    src = load(tmp_path / "cache")
    folder = Path(src.cache_dir)
    (folder / "test_x.npy").unlink()
    with pytest.raises(DataError) as e:
        open_cached_source(str(folder), "synthetic", src.mean, src.std)
    assert "test_x.npy is missing" in str(e.value) and f"delete {folder}" in str(e.value)


def small_split() -> FederatedSplit:
    idx = np.arange(30)
    return FederatedSplit(lt_indices=idx, client_train=[idx[:10], idx[10:30]], client_test=[idx[:3], idx[3:5]],
                          class_counts=np.array([[5, 5], [10, 10]]), global_counts=np.array([15, 15]))


@pytest.mark.parametrize("damage", ["truncated", "missing-array", "empty"])
def test_a_damaged_split_file_names_itself_and_what_to_delete(tmp_path, damage):
    path = tmp_path / "splits" / "abc.npz"
    small_split().save(path)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # like any file, not a private temp file
    if damage == "truncated":
        truncate(path)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k != "test_1"}
        np.savez(path, **arrays)
    with pytest.raises(DataError) as e:
        FederatedSplit.load(path)
    assert f"the split file {path} is damaged" in str(e.value) and f"delete {path}" in str(e.value)
    assert hidden(path.parent) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_no_json_meta_key_leaks_into_the_source(tmp_path):
    src = load(tmp_path / "cache")
    assert "shapes" not in src.meta and "arrays" not in src.meta
    meta = json.loads((Path(src.cache_dir) / "meta.json").read_text())
    assert meta["shapes"]["train_x"] == [48, 6, 6, 3]
