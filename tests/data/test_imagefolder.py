"""The imagefolder source (any user data set) and the synthetic source."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from fedlt.data.sources import DataError, load_source
from tests.data.conftest import png_bytes


def icfg(path, **extra) -> dict:
    d = {"name": "imagefolder", "source": "imagefolder", "path": str(path), "image_size": 8, "channels": 3,
         "test_fraction": 0.25, "split_seed": 0, "mean": None, "std": None}
    d.update(extra)
    return d


def write_folder(root, layout: dict[str, int], size=(10, 12), split=True):
    """layout: class -> number of images; with ``split`` also a test/ folder with one image per class."""
    rng = np.random.default_rng(0)
    for c, n in layout.items():
        for s, m in ((("train", n), ("test", 1)) if split else (("", n),)):
            d = root / s / c if s else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(m):
                (d / f"{i:03d}.png").write_bytes(png_bytes(rng.integers(0, 256, (*size, 3), dtype=np.uint8)))
    return root


def test_folder_with_splits_resized_and_class_names_sorted(tmp_path):
    root = write_folder(tmp_path / "med", {"nodule": 5, "normal": 7, "effusion": 3})
    s = load_source(icfg(root), None, tmp_path / "cache")
    assert s.classes == ["effusion", "nodule", "normal"]
    assert s.train_x.shape == (15, 8, 8, 3) and np.bincount(s.train_y).tolist() == [3, 5, 7]
    assert len(s.test_y) == 3 and len(s.mean) == 3 and all(0 < v < 1 for v in s.std)


def test_zip_without_split_folders_holds_out_a_test_split_per_class(tmp_path):
    root = write_folder(tmp_path / "data" / "xray", {"a": 8, "b": 4}, split=False)
    z = tmp_path / "xray.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in sorted(root.rglob("*.png")):
            f.write(p, p.relative_to(tmp_path / "data").as_posix())  # one root folder: xray/<class>/<img>
    s = load_source(icfg(z, channels=1, image_size=[6, 4]), None, tmp_path / "cache")
    assert s.classes == ["a", "b"] and s.train_x.shape[1:] == (6, 4, 1)
    assert np.bincount(s.test_y).tolist() == [2, 1] and np.bincount(s.train_y).tolist() == [6, 3]


def test_no_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no training images"):
        load_source(icfg(tmp_path / "empty"), None, tmp_path / "cache")


def test_one_class_is_a_clear_error(tmp_path):
    root = write_folder(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match=r"only the class folder 'only'.*at least two classes"):
        load_source(icfg(root), None, tmp_path / "cache")
    flat = write_folder(tmp_path / "flat", {"single": 3}, split=False)
    with pytest.raises(DataError, match="at least two classes"):
        load_source(icfg(flat), None, tmp_path / "cache")


def test_missing_path_and_mixed_sizes(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(icfg(tmp_path / "nope"), None, tmp_path / "cache")
    root = write_folder(tmp_path / "mixed", {"a": 2, "b": 2})
    (root / "train" / "b" / "big.png").write_bytes(png_bytes(np.zeros((20, 20, 3), np.uint8)))
    with pytest.raises(DataError, match="set dataset.image_size"):
        load_source(icfg(root, image_size=None), None, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "sources").iterdir())


def synth_cfg(**extra) -> dict:
    d = {"name": "synthetic_lt", "source": "synthetic", "num_classes": 10, "train_per_class": 60,
         "test_per_class": 20, "image_size": 12, "channels": 3, "mean": None, "std": None}
    d.update(extra)
    return d


def test_synthetic_is_seeded_cached_and_sized(tmp_path):
    a = load_source(synth_cfg(num_classes=120, train_per_class=5, test_per_class=2), None, tmp_path / "c1")
    b = load_source(synth_cfg(num_classes=120, train_per_class=5, test_per_class=2), None, tmp_path / "c2")
    assert a.num_classes == 120 and a.train_x.shape == (600, 12, 12, 3) and len(a.test_y) == 240
    assert np.array_equal(a.train_x, b.train_x)  # same options -> the same data set on every machine
    c = load_source(synth_cfg(num_classes=120, train_per_class=5, test_per_class=2, data_seed=1), None, tmp_path / "c1")
    assert not np.array_equal(a.train_x, c.train_x) and c.cache_dir != a.cache_dir


def test_synthetic_is_learnable_by_the_small_cnn(tmp_path):
    """Three epochs of plain SGD on 600 images give far above chance (0.1) on the balanced test split."""
    from fedlt.data.augment import to_float
    from fedlt.models import build_model

    s = load_source(synth_cfg(), None, tmp_path / "cache")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: threading only adds overhead on a busy machine
    try:
        x = to_float(torch.from_numpy(np.array(s.train_x)), s.mean, s.std)
        y = torch.from_numpy(np.array(s.train_y))
        model = build_model({"name": "cnn", "width": 16, "feature_dim": 64}, 3, s.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            perm = torch.randperm(len(y))
            for i in range(0, len(y), 32):
                idx = perm[i:i + 32]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            pred = model(to_float(torch.from_numpy(np.array(s.test_x)), s.mean, s.std)).argmax(1)
    finally:
        torch.set_num_threads(threads)
    acc = (pred == torch.from_numpy(np.array(s.test_y))).float().mean().item()
    assert acc > 0.5, acc


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb as Pillow sees it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_clear_paragraph(tmp_path):
    root = write_folder(tmp_path / "data", {"a": 2, "b": 2})
    (root / "train" / "b" / "huge.png").write_bytes(png_header_only(20000, 20000))  # 400 million pixels
    with pytest.raises(DataError) as e:
        load_source(icfg(root), None, tmp_path / "cache")
    msg = str(e.value)
    assert "train/b/huge.png" in msg and "decompression bomb" in msg and "remove it from the data set" in msg
    assert "\n" not in msg
    assert not list((tmp_path / "cache" / "sources").iterdir())  # nothing half-written is kept
