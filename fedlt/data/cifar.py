"""CIFAR-10 and CIFAR-100 sources.

Accepted layouts (``dataset.path`` names one explicitly; otherwise ``data_root`` and the download cache are
searched, see :func:`find_cifar`):

* the official python-pickle folders ``cifar-10-batches-py/`` / ``cifar-100-python/`` or their ``.tar.gz``
  archives (extracted once into ``<cache_dir>/downloads``);
* an image folder or zip ``{train,test}/<class>/<image>``, optionally inside one root folder (the shared
  ``cifar10-jpeg.zip`` / ``cifar100-png.zip``).

Labels always follow the official label order (for CIFAR-100 ``fine_label_names.txt`` is honoured when the
zip has one; the official orders are also the sorted folder names). CIFAR-100 also stores the 20 coarse
superclass labels (``dataset.label_type=coarse``). ``dataset.download=true`` fetches the official archive,
verifies its md5 and extracts it; nothing is ever downloaded otherwise.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import pickle
import re
import shutil
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from fedlt.data.imagefolder import DECODER_VERSION, ImageArchive, channel_stats, decode_split, resolve_path, scan
from fedlt.data.sources import (DataError, SourceArrays, cache_lock, cache_write_error, cached_arrays,
                                remove_stale_temps, sha256_files, temp_name)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
]
CIFAR100_COARSE_CLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores", "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes", "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates",
    "people", "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
]
# The official CIFAR-100 hierarchy: coarse label of each fine label (used when a copy has no coarse labels).
CIFAR100_FINE_TO_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10,
    12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12,
    16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8,
    14, 13,
]


class Official:
    """Where the official archive lives and what it unpacks to."""

    def __init__(self, url: str, archive: str, md5: str, folder: str, classes: list[str], zips: tuple[str, ...],
                 folders: tuple[str, ...]):
        self.url, self.archive, self.md5, self.folder = url, archive, md5, folder
        self.classes = classes
        self.zips = zips  # image-folder zips looked for in data_root
        self.folders = folders  # image folders looked for in data_root


OFFICIAL = {
    "cifar10": Official("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                        "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py", CIFAR10_CLASSES,
                        ("cifar10-jpeg.zip", "cifar10-png.zip", "cifar10.zip"), ("cifar10-png", "cifar10")),
    "cifar100": Official("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
                         "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", CIFAR100_CLASSES,
                         ("cifar100-png.zip", "cifar100.zip"), ("cifar100-png", "cifar100")),
}
# Copies whose sha256 is known: the JPEG / PNG zips of the official splits that fedlt's data folder
# (FEDLT_DATA_ROOT) is set up with. Recorded as information, never required.
KNOWN_SHA256 = {
    "a841a7cf47af83a7bb5190b4f08b18a9ec146ff14ef965f07c08081f988c201e":
        "cifar10-jpeg.zip (JPEG-compressed, official split)",
    "153d66ee7f9abfd9c86fc0a5f57efc7b1b24218baa67630b89171f523c2ea77f":
        "cifar100-png.zip (pixel-exact, official split)",
}
PICKLE_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta"},
    "cifar100": {"train": ["train"], "test": ["test"], "meta": "meta"},
}


# --------------------------------------------------------------------------------------------- download
def fetch(url: str, target: Path, md5: str) -> Path:
    """Download ``url`` to ``target`` (via ``target.part``) and verify its md5; a mismatch deletes the file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except (OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"downloading {url} failed ({e}); check the network, or put the data in data_root "
                        f"(env FEDLT_DATA_ROOT) and leave dataset.download=false") from e
    got = md5_file(tmp)
    if got != md5:
        tmp.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {url}: md5 {got}, expected {md5}; the download is corrupt or not the "
                        f"official file (it was deleted); try again or use another copy")
    os.replace(tmp, target)
    return target


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_tar(archive: Path, dest_dir: Path, folder: str) -> Path:
    """Extract ``archive`` (only regular files and folders, nothing outside the target) and move its ``folder``
    to ``dest_dir/folder`` in one rename: an interrupted or failed extraction leaves nothing behind (a temporary
    folder of a killed extraction is removed by the next one)."""
    target = dest_dir / folder
    with cache_lock(dest_dir, folder, "the extracted CIFAR archive"):
        remove_stale_temps(dest_dir, folder, old_style=rf"\.{re.escape(folder)}-[a-z0-9_]{{8}}")
        tmp = dest_dir / temp_name(folder)
        try:
            try:
                tmp.mkdir()
                with tarfile.open(archive, "r:*") as tf:
                    tf.extractall(tmp, filter="data")
            except (tarfile.TarError, EOFError, zlib.error) as e:
                raise DataError(f"{archive} is not a readable tar archive ({e}): it is corrupt or truncated; "
                                f"delete it and download it again") from e
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
                    raise cache_write_error(e, dest_dir, "the extracted CIFAR archive") from e
                raise DataError(f"{archive} is not a readable tar archive ({e}): it is corrupt or truncated; "
                                f"delete it and download it again") from e
            if not (tmp / folder).is_dir():
                raise DataError(f"{archive} does not contain the folder {folder}/; it is not the official archive")
            try:
                os.replace(tmp / folder, target)
            except OSError:  # already extracted (a folder that is not empty is not replaced)
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_official(kind: str, cache_dir: Path, url: str | None = None) -> Path:
    """Fetch + verify + extract the official archive into ``<cache_dir>/downloads``; return the pickle folder."""
    o = OFFICIAL[kind]
    downloads = cache_dir / "downloads"
    archive = downloads / o.archive
    if not (archive.exists() and md5_file(archive) == o.md5):
        fetch(url or o.url, archive, o.md5)
    return extract_tar(archive, downloads, o.folder)


# --------------------------------------------------------------------------------------------- locating
def _is_pickle_folder(p: Path, kind: str) -> bool:
    f = PICKLE_FILES[kind]
    return p.is_dir() and all((p / n).is_file() for n in [*f["train"], *f["test"]])


def find_cifar(kind: str, cfg: dict, data_root: str | None, cache_dir: Path) -> Path:
    """The folder or zip to read: ``dataset.path`` if given; else the first of, in ``data_root`` then in
    ``<cache_dir>/downloads``: the pickle folder, the official ``.tar.gz`` (extracted once), an image zip, an
    image folder; else the official download when ``dataset.download=true``."""
    o = OFFICIAL[kind]
    downloads = cache_dir / "downloads"
    if cfg.get("path"):
        p = resolve_path(cfg["path"], data_root)
        if not p.exists():
            raise DataError(f"dataset.path={cfg['path']} does not exist (looked at {p}); point it at {o.folder}/, "
                            f"{o.archive}, or an image folder / zip {{train,test}}/<class>/<image>")
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")):
            return extract_tar(p, downloads, o.folder)
        if p.is_dir() and not _is_pickle_folder(p, kind) and _is_pickle_folder(p / o.folder, kind):
            return p / o.folder
        return p
    roots = [Path(os.path.expanduser(str(data_root)))] if data_root else []
    looked = []
    for root in [*roots, downloads]:
        for cand in (root / o.folder, root / kind / o.folder):
            looked.append(cand)
            if _is_pickle_folder(cand, kind):
                return cand
        looked.append(root / o.archive)
        if (root / o.archive).is_file():
            return extract_tar(root / o.archive, downloads, o.folder)
        for name in [*o.zips, *o.folders]:
            looked.append(root / name)
            if (root / name).exists():
                return root / name
    if cfg.get("download"):
        return download_official(kind, cache_dir, cfg.get("download_url"))
    raise DataError(
        f"{kind.upper()} was not found (looked in: {', '.join(str(p) for p in looked)}). Point data_root (env "
        f"FEDLT_DATA_ROOT) at a folder holding {o.folder}/, {o.archive} or {o.zips[0]}, name the folder or zip with "
        f"dataset.path=PATH, or allow the official download (md5-checked) with dataset.download=true."
    )


# --------------------------------------------------------------------------------------------- decoding
class _ArraysOnly(pickle.Unpickler):
    """Unpickler for the official CIFAR pickles: numpy arrays, lists, dicts, strings and numbers only -- a
    tampered file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR pickle")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError,
            KeyError) as e:
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}): the file is corrupt or "
                        f"truncated; delete the folder and extract or download the archive again") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR pickle (expected a dict, found {type(obj).__name__})")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _pickle_split(folder: Path, names: list[str], label_key: str, extra_key: str | None):
    xs, ys, extra = [], [], []
    for n in names:
        d = _read_pickle(folder / n)
        try:
            data = np.asarray(d["data"], dtype=np.uint8)
            labels = np.asarray(d[label_key], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
                raise ValueError(f"data {data.shape} and {len(labels)} labels")
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(labels)
            if extra_key:
                extra.append(np.asarray(d[extra_key], dtype=np.int64))
        except (KeyError, ValueError) as e:
            raise DataError(f"{folder / n} does not look like an official CIFAR pickle ({e}); the file is corrupt "
                            f"or from another data set") from e
    out = [np.concatenate(xs), np.concatenate(ys)]
    return (*out, np.concatenate(extra)) if extra_key else (*out, None)


def decode_pickles(kind: str, folder: Path) -> dict:
    f = PICKLE_FILES[kind]
    fine = kind == "cifar100"
    label_key, coarse_key = ("fine_labels", "coarse_labels") if fine else ("labels", None)
    train_x, train_y, train_c = _pickle_split(folder, f["train"], label_key, coarse_key)
    test_x, test_y, test_c = _pickle_split(folder, f["test"], label_key, coarse_key)
    classes = OFFICIAL[kind].classes
    if (folder / f["meta"]).is_file():
        meta = _read_pickle(folder / f["meta"])
        names = meta.get("fine_label_names" if fine else "label_names")
        if names is not None:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    out = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": classes}
    if fine:
        out.update({"train_y_coarse": train_c, "test_y_coarse": test_c})
    return out


def _zip_class_order(kind: str, archive: ImageArchive, layout, folders: list[str]) -> list[str]:
    official = OFFICIAL[kind].classes
    listed = layout.extra.get("fine_label_names.txt") or layout.extra.get("batches.meta.txt")
    if listed:
        order = archive.read(listed).decode().split()
        if sorted(order) != sorted(folders):
            raise DataError(f"{archive.path}: {listed} names {len(order)} classes but the class folders are "
                            f"{len(folders)} others ({', '.join(sorted(set(folders) ^ set(order))[:5])}, ...)")
        return order
    if sorted(folders) == sorted(official):
        return list(official)
    raise DataError(f"{archive.path} is not a {kind.upper()} copy: expected the {len(official)} class folders "
                    f"{', '.join(official[:4])}, ... under train/ and test/, found {len(folders)} "
                    f"({', '.join(sorted(folders)[:4])}, ...); use dataset=imagefolder for other data")


def _coarse_of(archive: ImageArchive, layout, classes: list[str]) -> np.ndarray:
    """fine -> coarse label map: the zip's fine_to_coarse.csv when present, else the official hierarchy."""
    table = layout.extra.get("fine_to_coarse.csv")
    by_name = {c: CIFAR100_FINE_TO_COARSE[i] for i, c in enumerate(CIFAR100_CLASSES)}
    if table:
        rows = list(csv.DictReader(io.StringIO(archive.read(table).decode())))
        by_name = {r["fine_name"]: int(r["coarse_id"]) for r in rows}
    try:
        return np.asarray([by_name[c] for c in classes], dtype=np.int64)
    except KeyError as e:
        raise DataError(f"{archive.path}: no coarse label for class {e}") from e


def decode_image_copy(kind: str, archive: ImageArchive) -> dict:
    layout = scan(archive.names)
    if not layout.has_splits:
        raise DataError(f"{archive.path} has no train/ and test/ class folders; a CIFAR copy needs "
                        f"{{train,test}}/<class>/<image> (optionally inside one root folder)")
    folders = sorted(layout.images["train"])
    classes = _zip_class_order(kind, archive, layout, folders)
    if sorted(layout.images["test"]) != sorted(folders):
        raise DataError(f"{archive.path}: train/ and test/ have different class folders")
    train_x, train_y = decode_split(archive, layout.images["train"], classes, None, "RGB")
    test_x, test_y = decode_split(archive, layout.images["test"], classes, None, "RGB")
    if train_x.shape[1:] != (32, 32, 3):
        raise DataError(f"{archive.path}: images are {train_x.shape[2]}x{train_x.shape[1]}, CIFAR images are 32x32")
    out = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": classes,
           "meta": {"layout_root": layout.root}}
    if kind == "cifar100":
        coarse = _coarse_of(archive, layout, classes)
        out.update({"train_y_coarse": coarse[train_y], "test_y_coarse": coarse[test_y]})
    return out


def _with_stats(kind: str, arrays: dict) -> dict:
    """Add what client actors need to the cache's meta.json: training-image statistics (used when
    dataset.mean/std are null) and, for CIFAR-100, the coarse class names."""
    mean, std = channel_stats(arrays["train_x"])
    arrays["meta"] = {**arrays.get("meta", {}), "mean": mean, "std": std}
    if kind == "cifar100":
        arrays["meta"]["classes_coarse"] = CIFAR100_COARSE_CLASSES
    return arrays


def _load(kind: str, cfg: dict, data_root: str | None, cache_dir: Path) -> SourceArrays:
    where = find_cifar(kind, cfg, data_root, cache_dir)
    expected = cfg.get("sha256")
    if _is_pickle_folder(where, kind):
        files = [where / n for n in [*PICKLE_FILES[kind]["train"], *PICKLE_FILES[kind]["test"]]]
        if (where / PICKLE_FILES[kind]["meta"]).is_file():
            files.append(where / PICKLE_FILES[kind]["meta"])
        digest = sha256_files(files)
        layout_name = "pickle"

        def decode() -> dict:
            return _with_stats(kind, decode_pickles(kind, where))
        archive = None
    else:
        archive = ImageArchive(where)
        digest = archive.fingerprint()
        layout_name = "zip" if where.is_file() else "image folder"

        def decode() -> dict:
            return _with_stats(kind, decode_image_copy(kind, archive))
    try:
        if expected and str(expected).lower() != digest:
            raise DataError(f"checksum mismatch for {where}: sha256 {digest}, but dataset.sha256={expected}; the file "
                            f"is corrupt or a different copy (remove dataset.sha256 to accept it)")
        key = f"{kind}-{digest[:16]}-v{DECODER_VERSION}"
        arrays, cache = cached_arrays(cache_dir / "sources", key, decode)
    finally:
        if archive is not None:
            archive.close()
    n_train, n_test = len(arrays["train_y"]), len(arrays["test_y"])
    meta = {"source_path": str(where), "layout": layout_name, "sha256": digest,
            "known_copy": KNOWN_SHA256.get(digest), "train_images": n_train, "test_images": n_test,
            **arrays["meta"]}
    label_type = cfg.get("label_type", "fine")
    classes, train_y, test_y, suffix = arrays["classes"], arrays["train_y"], arrays["test_y"], ""
    if label_type == "coarse":
        if kind != "cifar100":
            raise DataError(f"dataset.label_type=coarse exists only for CIFAR-100, not {kind}")
        suffix = "_coarse"
        classes, train_y, test_y = CIFAR100_COARSE_CLASSES, arrays["train_y_coarse"], arrays["test_y_coarse"]
    meta["label_type"] = label_type
    return SourceArrays(name=kind, classes=list(classes), train_x=arrays["train_x"], train_y=train_y,
                        test_x=arrays["test_x"], test_y=test_y, mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                        cache_dir=str(cache), meta=meta, label_suffix=suffix)


def load_cifar10(cfg: dict, data_root: str | None, cache_dir: Path) -> SourceArrays:
    return _load("cifar10", cfg, data_root, cache_dir)


def load_cifar100(cfg: dict, data_root: str | None, cache_dir: Path) -> SourceArrays:
    return _load("cifar100", cfg, data_root, cache_dir)
