"""CIFAR sources: every layout gives the same arrays in the official label order; decoding happens once; bad
archives fail with a clear DataError and leave nothing in the cache; the download path is checksum-verified."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

import fedlt.data.cifar as cifar
from fedlt.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR100_COARSE_CLASSES, CIFAR100_FINE_TO_COARSE
from fedlt.data.longtail import longtail_counts, select_longtail
from fedlt.data.sources import DataError, load_source, open_cached_source
from tests.data.conftest import cifar_cfg, fake_images, png_bytes, tar_folder, write_image_zip, write_pickles


def per_class(x: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    return np.asarray(x)[np.asarray(y) == c]


def cache_entries(cache):
    d = cache / "sources"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_pickle_folder_and_zips_in_both_layouts_decode_to_the_same_images(tmp_path, kind):
    folder = write_pickles(tmp_path / cifar.OFFICIAL[kind].folder, kind, 3, 1)
    flat = write_image_zip(tmp_path / "flat.zip", kind, 3, 1)
    rooted = write_image_zip(tmp_path / "rooted.zip", kind, 3, 1, root="copy")
    cache = tmp_path / "cache"
    srcs = [load_source(cifar_cfg(kind, path=str(p)), None, cache) for p in (folder, flat, rooted)]
    classes = CIFAR10_CLASSES if kind == "cifar10" else CIFAR100_CLASSES
    for s in srcs:
        assert s.classes == classes
        assert s.train_x.shape == (3 * len(classes), 32, 32, 3) and s.test_x.shape == (len(classes), 32, 32, 3)
        assert np.bincount(s.train_y).tolist() == [3] * len(classes)
        # the marker pixel says (class, position within class, split): labels follow the official order
        assert np.array_equal(s.train_x[:, 0, 0, 0], s.train_y) and np.all(s.train_x[:, 0, 0, 2] == 1)
    for c in (0, len(classes) - 1):
        ref = per_class(srcs[0].train_x, srcs[0].train_y, c)
        for s in srcs[1:]:
            assert np.array_equal(per_class(s.train_x, s.train_y, c), ref)  # same within-class order
    # hence the same long-tailed subset, whichever copy is used
    counts = longtail_counts(len(classes), 3, 3)
    picked = [np.asarray(s.train_x)[select_longtail(s.train_y, counts)] for s in srcs]
    assert all(np.array_equal(p, picked[0]) for p in picked[1:])


def test_cifar100_coarse_labels_from_pickles_and_zip(tmp_path):
    folder = write_pickles(tmp_path / "cifar-100-python", "cifar100", 2, 1)
    z = write_image_zip(tmp_path / "c100.zip", "cifar100", 2, 1, root="cifar100-png")
    cache = tmp_path / "cache"
    mapping = np.asarray(CIFAR100_FINE_TO_COARSE)
    for p in (folder, z):
        fine = load_source(cifar_cfg("cifar100", path=str(p)), None, cache)
        coarse = load_source(cifar_cfg("cifar100", path=str(p), label_type="coarse"), None, cache)
        assert coarse.classes == CIFAR100_COARSE_CLASSES and coarse.num_classes == 20
        assert np.array_equal(coarse.train_y, mapping[np.asarray(fine.train_y)])
        # client actors re-open the cache by path and get the same labels and names
        again = open_cached_source(coarse.cache_dir, "cifar100", coarse.mean, coarse.std, coarse.label_suffix)
        assert np.array_equal(again.test_y, coarse.test_y) and again.classes == CIFAR100_COARSE_CLASSES


def test_fine_label_names_file_sets_the_class_order(tmp_path):
    names = "\n".join(CIFAR100_CLASSES).encode()
    z = write_image_zip(tmp_path / "c.zip", "cifar100", 1, 1, root="r", extras={"fine_label_names.txt": names})
    s = load_source(cifar_cfg("cifar100", path=str(z)), None, tmp_path / "cache")
    assert s.classes == CIFAR100_CLASSES


def test_second_load_is_a_cache_hit_without_decoding(tmp_path, monkeypatch):
    folder = write_pickles(tmp_path / "cifar-10-batches-py", "cifar10", 2, 1)
    z = write_image_zip(tmp_path / "c10.zip", "cifar10", 2, 1)
    cache = tmp_path / "cache"
    first = [load_source(cifar_cfg("cifar10", path=str(p)), None, cache) for p in (folder, z)]

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cifar, "decode_pickles", boom)
    monkeypatch.setattr(cifar, "decode_image_copy", boom)
    second = [load_source(cifar_cfg("cifar10", path=str(p)), None, cache) for p in (folder, z)]
    for a, b in zip(first, second, strict=True):
        assert a.cache_dir == b.cache_dir and np.array_equal(a.train_x, b.train_x)
        assert isinstance(b.train_x, np.memmap)  # memory-mapped, shared by actors through the page cache


def test_data_root_search_finds_pickles_tar_and_zip(tmp_path):
    cache = tmp_path / "cache"
    root = tmp_path / "root"
    write_pickles(tmp_path / "src" / "cifar-10-batches-py", "cifar10", 1, 1)
    root.mkdir()
    tar_folder(tmp_path / "src" / "cifar-10-batches-py", root / "cifar-10-python.tar.gz")
    s = load_source(cifar_cfg("cifar10"), str(root), cache)
    assert s.meta["layout"] == "pickle" and (cache / "downloads" / "cifar-10-batches-py").is_dir()
    root2 = tmp_path / "root2"
    root2.mkdir()
    write_image_zip(root2 / "cifar10-jpeg.zip", "cifar10", 1, 1)
    s2 = load_source(cifar_cfg("cifar10"), str(root2), tmp_path / "cache2")
    assert s2.meta["layout"] == "zip" and s2.meta["known_copy"] is None and len(s2.meta["sha256"]) == 64


def test_nothing_found_is_a_clear_error_and_nothing_is_downloaded(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR10 was not found .*dataset.download=true"):
        load_source(cifar_cfg("cifar10"), str(tmp_path), tmp_path / "cache")
    assert not (tmp_path / "cache" / "downloads").exists()


@pytest.fixture
def official_archive(tmp_path, monkeypatch):
    """A small stand-in for cifar-10-python.tar.gz served from a file:// URL, with its md5 registered."""
    write_pickles(tmp_path / "srv" / "cifar-10-batches-py", "cifar10", 2, 1)
    archive = tar_folder(tmp_path / "srv" / "cifar-10-batches-py", tmp_path / "srv" / "cifar-10-python.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(cifar.OFFICIAL["cifar10"], "md5", md5)
    return archive


def test_download_verifies_and_extracts(tmp_path, official_archive):
    cache = tmp_path / "cache"
    cfg = cifar_cfg("cifar10", download=True, download_url=official_archive.as_uri())
    s = load_source(cfg, None, cache)
    assert s.num_classes == 10 and len(s.train_y) == 20
    downloads = sorted(p.name for p in (cache / "downloads").iterdir())
    assert downloads == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]  # no .part, no temp folder


def test_download_over_http_from_localhost(tmp_path, official_archive):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(official_archive.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{official_archive.name}"
        s = load_source(cifar_cfg("cifar10", download=True, download_url=url), None, tmp_path / "cache")
        assert len(s.test_y) == 10
    finally:
        server.shutdown()
        server.server_close()


def test_download_checksum_mismatch_leaves_nothing(tmp_path, official_archive, monkeypatch):
    monkeypatch.setattr(cifar.OFFICIAL["cifar10"], "md5", "0" * 32)
    cache = tmp_path / "cache"
    cfg = cifar_cfg("cifar10", download=True, download_url=official_archive.as_uri())
    with pytest.raises(DataError, match="checksum mismatch"):
        load_source(cfg, None, cache)
    assert list((cache / "downloads").iterdir()) == [] and cache_entries(cache) == []


def test_sha256_option_mismatch_is_refused(tmp_path):
    z = write_image_zip(tmp_path / "c.zip", "cifar10", 1, 1)
    with pytest.raises(DataError, match=r"checksum mismatch .*dataset.sha256"):
        load_source(cifar_cfg("cifar10", path=str(z), sha256="ab" * 32), None, tmp_path / "cache")
    good = hashlib.sha256(z.read_bytes()).hexdigest()
    assert load_source(cifar_cfg("cifar10", path=str(z), sha256=good), None, tmp_path / "cache").num_classes == 10


def test_truncated_zip_is_refused_and_nothing_cached(tmp_path):
    z = write_image_zip(tmp_path / "c.zip", "cifar10", 2, 1)
    data = z.read_bytes()
    z.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_source(cifar_cfg("cifar10", path=str(z)), None, tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


def test_corrupt_image_in_zip_is_refused_and_no_half_written_cache(tmp_path):
    z = write_image_zip(tmp_path / "c.zip", "cifar10", 2, 1)
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("train/truck/9999.png", png_bytes(fake_images("cifar10", "train", 1)[0][0])[:60])
    with pytest.raises(DataError, match=r"9999.png .*cannot be decoded"):
        load_source(cifar_cfg("cifar10", path=str(z)), None, tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []  # the temporary folder was removed


def test_interrupted_decode_leaves_no_cache(tmp_path, monkeypatch):
    z = write_image_zip(tmp_path / "c.zip", "cifar10", 1, 1)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cifar, "decode_image_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_source(cifar_cfg("cifar10", path=str(z)), None, tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


def test_corrupt_pickle_and_tar_are_refused(tmp_path):
    folder = write_pickles(tmp_path / "cifar-10-batches-py", "cifar10", 1, 1)
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR pickle"):
        load_source(cifar_cfg("cifar10", path=str(folder)), None, tmp_path / "cache")
    bad_tar = tmp_path / "cifar-10-python.tar.gz"
    bad_tar.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(DataError, match="not a readable tar archive"):
        load_source(cifar_cfg("cifar10", path=str(bad_tar)), None, tmp_path / "cache2")
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache2" / "downloads").iterdir())


def test_pickle_with_code_is_refused(tmp_path):
    folder = write_pickles(tmp_path / "cifar-10-batches-py", "cifar10", 1, 1)
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="unexpected object"):
        load_source(cifar_cfg("cifar10", path=str(folder)), None, tmp_path / "cache")


def test_zip_with_other_classes_is_not_taken_for_cifar(tmp_path):
    import zipfile as zf

    z = tmp_path / "other.zip"
    img = png_bytes(np.zeros((32, 32, 3), np.uint8))
    with zf.ZipFile(z, "w") as f:
        for split in ("train", "test"):
            for c in ("cats", "dogs"):
                f.writestr(f"{split}/{c}/0.png", img)
    with pytest.raises(DataError, match="is not a CIFAR10 copy.*dataset=imagefolder"):
        load_source(cifar_cfg("cifar10", path=str(z)), None, tmp_path / "cache")
