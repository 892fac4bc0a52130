"""Fabricated CIFAR copies in every layout users have (official pickle folders, their tar.gz, image zips with and
without a root folder), small enough to build in a fraction of a second, and access to the real shared copies."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedlt.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR100_FINE_TO_COARSE
from tests.conftest import SHARED_DATA

REAL_ZIPS = {"cifar10": SHARED_DATA / "cifar10-jpeg.zip", "cifar100": SHARED_DATA / "cifar100-png.zip"}


def fake_images(kind: str, split: str, per_class: int, seed: int = 0):
    """Images whose pixels say what they are: pixel (0,0) = (class, position within class, split id); the rest
    is seeded noise. Labels are interleaved (as in the official pickles), not class-sorted."""
    classes = CIFAR10_CLASSES if kind == "cifar10" else CIFAR100_CLASSES
    k = len(classes)
    rng = np.random.default_rng([seed, k, per_class, split == "train"])
    labels = rng.permutation(np.repeat(np.arange(k), per_class))
    x = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    pos = np.zeros(k, dtype=int)
    for i, c in enumerate(labels):
        x[i, 0, 0] = (c, pos[c], 1 if split == "train" else 2)
        pos[c] += 1
    return x, labels


def write_pickles(folder: Path, kind: str, train_per_class: int, test_per_class: int) -> Path:
    """The official python-pickle layout (Python-2-style bytes keys, protocol 2, flattened CHW rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    tr_x, tr_y = fake_images(kind, "train", train_per_class)
    te_x, te_y = fake_images(kind, "test", test_per_class)

    def dump(name, x, y):
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        if kind == "cifar10":
            d = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": rows,
                 b"filenames": [f"{i}.png".encode() for i in range(len(y))]}
        else:
            d = {b"fine_labels": [int(v) for v in y], b"coarse_labels": [CIFAR100_FINE_TO_COARSE[v] for v in y],
                 b"data": rows, b"filenames": [f"{i}.png".encode() for i in range(len(y))]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)

    if kind == "cifar10":
        parts = np.array_split(np.arange(len(tr_y)), 5)
        for i, idx in enumerate(parts, start=1):
            dump(f"data_batch_{i}", tr_x[idx], tr_y[idx])
        dump("test_batch", te_x, te_y)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}, f, protocol=2)
    else:
        dump("train", tr_x, tr_y)
        dump("test", te_x, te_y)
        with open(folder / "meta", "wb") as f:
            pickle.dump({b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES],
                         b"coarse_label_names": [b"x"] * 20}, f, protocol=2)
    return folder


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_image_zip(path: Path, kind: str, train_per_class: int, test_per_class: int, root: str | None = None,
                    extras: dict[str, bytes] | None = None) -> Path:
    """``{root/}{train,test}/<class>/NNNN.png`` with NNNN = position within the class (official order)."""
    classes = CIFAR10_CLASSES if kind == "cifar10" else CIFAR100_CLASSES
    prefix = f"{root}/" if root else ""
    with zipfile.ZipFile(path, "w") as z:
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            x, y = fake_images(kind, split, n)
            pos = np.zeros(len(classes), dtype=int)
            for img, c in zip(x, y, strict=True):
                z.writestr(f"{prefix}{split}/{classes[c]}/{pos[c]:04d}.png", png_bytes(img))
                pos[c] += 1
        for name, data in (extras or {}).items():
            z.writestr(prefix + name, data)
    return path


def tar_folder(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


def cifar_cfg(kind: str, **extra) -> dict:
    d = {"name": f"{kind}_lt", "source": kind, "path": None, "download": False, "imbalance_factor": 1,
         "profile": "exp", "n_max": None, "mean": None, "std": None}
    d.update(extra)
    return d


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory) -> Path:
    """A fresh cache folder whose ``sources/`` is the user's (FEDLT_CACHE_DIR or ~/.cache/fedlt): the real zips
    are decoded at most once per machine (not per test session), while splits are always drawn afresh."""
    user = Path(os.path.expanduser(os.environ.get("FEDLT_CACHE_DIR") or "~/.cache/fedlt"))
    (user / "sources").mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("real-cache")
    (cache / "sources").symlink_to(user / "sources", target_is_directory=True)
    return cache


def needs_real(kind: str):
    return pytest.mark.skipif(not REAL_ZIPS[kind].is_file(),
                              reason=f"{REAL_ZIPS[kind]} not present (set FEDLT_DATA_ROOT to the shared data folder)")


@pytest.fixture(scope="session")
def real_sources(real_cache_dir):
    """Load (decoding once, ~15 s per zip on one core) the real shared CIFAR zips; skip when absent."""
    from fedlt.data.sources import load_source

    loaded = {}

    def get(kind: str):
        if not REAL_ZIPS[kind].is_file():
            pytest.skip(f"{REAL_ZIPS[kind]} not present (set FEDLT_DATA_ROOT to the shared data folder)")
        if kind not in loaded:
            loaded[kind] = load_source(cifar_cfg(kind), str(SHARED_DATA), real_cache_dir)
        return loaded[kind]

    return get
