"""Dataset sources: find the raw files, decode them once, cache the arrays.

A source yields :class:`SourceArrays` (uint8 images N x H x W x C, int64 labels, the official class order).
Decoded arrays are cached under ``<cache_dir>/sources/<name>-<hash>/`` keyed by the SHA-256 of the raw
files, written to a temporary folder (``.<key>.tmp-*``) and renamed into place, so a second run starts without
decoding and an interrupted decode never leaves a half-written cache. Arrays are opened memory-mapped: every Ray
actor on a machine shares the same page cache instead of holding its own copy.

A damaged cache is never used: before a cache is opened its ``meta.json`` and the header and size of every
``.npy`` file are checked (a truncated or missing file, a folder left by a killed decode); a damaged cache is
decoded again, under a lock (``.<key>.lock``, removed afterwards) so that processes sharing the cache decode
it once, and temporary folders of killed decodes are removed. A cache folder that cannot be written is one
clear :class:`DataError`; an already complete cache is only read, so a read-only shared cache works.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("fedlt")


class DataError(RuntimeError):
    """Missing, corrupt or unusable data (reported to the user as one paragraph, no traceback)."""


@dataclass
class SourceArrays:
    name: str
    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cache_dir: str = ""
    meta: dict = field(default_factory=dict)
    label_suffix: str = ""  # "" = the primary labels; "_coarse" = CIFAR-100 superclasses (train_y_coarse.npy)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the models see it."""
        _, h, w, c = self.train_x.shape
        return (c, h, w)


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of one file's bytes (what ``sha256sum`` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


ARRAY_NAMES = ("train_x", "train_y", "test_x", "test_y")


def _array_names(arrays: dict) -> list[str]:
    """The four required arrays plus any extra ``train_*`` / ``test_*`` arrays (e.g. coarse labels)."""
    extra = sorted(k for k, v in arrays.items() if isinstance(v, np.ndarray) and k.startswith(("train_", "test_"))
                   and k not in ARRAY_NAMES)
    return [*ARRAY_NAMES, *extra]


# ------------------------------------------------------------------------------------------- cache folders
CACHE_HINT = "choose another folder with cache_dir=PATH (or the environment variable FEDLT_CACHE_DIR)"
OLD_TEMP_AGE_S = 3600  # temporary names of older fedlt versions carry no lock: removed once this old


def cache_write_error(e: OSError, folder: Path, what: str = "the decoded data") -> DataError:
    """One paragraph for a cache folder that cannot be written (read-only, a file, a full disk)."""
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        why = f"the device holding {folder} is full (nothing half-written was kept); free space there, or"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = (f"{folder} is not writable ({e.strerror}); fedlt keeps {what} there, decoded once and reused. "
               f"Make it writable, or")
    elif code in (errno.ENOTDIR, errno.EEXIST):
        wanted = Path(e.filename or folder)  # the file that stands where a folder should be:
        blocker = next((q for q in (wanted, *wanted.parents) if q.exists() and not q.is_dir()), wanted)
        why = f"{blocker} is a file where fedlt needs a folder for {what}; move it away, or"
    else:
        why = f"{what} cannot be written to {folder} ({e.strerror or e}); check the folder, or"
    return DataError(f"{why} {CACHE_HINT}.")


@contextmanager
def cache_lock(folder: Path, name: str, what: str = "the decoded data") -> Iterator[None]:
    """Hold the exclusive lock ``folder/.<name>.lock`` (creating ``folder``): one process at a time builds
    ``name``; others wait, then find it built. The lock file is removed on release (a waiter that opened the
    removed file notices and retries), so nothing is left behind; a process that dies releases it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        folder.mkdir(parents=True, exist_ok=True)
        yield
        return
    path = folder / f".{name}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("waiting for another fedlt process that is preparing %s in %s", what, folder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this lock file while we waited: take the new one
    except OSError as e:
        raise cache_write_error(e, folder, what) from e
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def temp_name(name: str, suffix: str = "") -> str:
    """A hidden temporary name for ``name`` (unique per process and call)."""
    return f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def remove_stale_temps(folder: Path, name: str, old_style: str | None = None) -> list[Path]:
    """Remove the temporary files and folders of ``name`` left by killed processes. Call it holding
    :func:`cache_lock` for ``name``: every live writer of ``name`` holds that lock, so any temporary of ``name``
    found then is stale. ``old_style`` (a regex) matches names older fedlt versions used; those are removed only
    when older than an hour (they carry no lock)."""
    removed = []
    if not folder.is_dir():
        return removed
    prefix = f".{name}.tmp-"
    for p in folder.iterdir():
        stale = p.name.startswith(prefix)
        if not stale and old_style and re.fullmatch(old_style, p.name):
            try:
                stale = time.time() - p.lstat().st_mtime > OLD_TEMP_AGE_S
            except OSError:
                stale = False
        if stale:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.warning("removed %d temporary item(s) left in %s by an interrupted fedlt process (%s)", len(removed),
                    folder, ", ".join(p.name for p in removed))
    return removed


def _npy_problem(path: Path, shape=None) -> str | None:
    """Why ``path`` is not a complete .npy file (None when it is): missing, unreadable header, truncated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header_shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                header_shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        return f"{path.name} is not a readable .npy file ({e})"
    expected = offset + int(np.prod(header_shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        return f"{path.name} is {state} ({size:,} bytes, expected {expected:,})"
    if shape is not None and list(header_shape) != list(shape):
        return f"{path.name} holds an array of shape {list(header_shape)}, expected {list(shape)}"
    return None


def cache_problem(target: Path) -> str | None:
    """Why the cache folder ``target`` cannot be used (None when it is complete; "absent" when not there)."""
    if not target.exists():
        return "absent"
    if not target.is_dir():
        return f"{target.name} is not a folder"
    try:
        meta = json.loads((target / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError) as e:
        return f"meta.json cannot be read ({e})"
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
        return "meta.json does not describe a decoded data set"
    names = meta.get("arrays", ARRAY_NAMES)
    shapes = meta.get("shapes") or {}
    if not isinstance(names, list | tuple) or not set(ARRAY_NAMES) <= set(names):
        return "meta.json does not list the arrays"
    for n in names:
        problem = _npy_problem(target / f"{n}.npy", shapes.get(n) if isinstance(shapes, dict) else None)
        if problem:
            return problem
    return None


def _open_cache(target: Path) -> dict:
    meta = json.loads((target / "meta.json").read_text())
    meta.pop("shapes", None)
    out = {n: np.load(target / f"{n}.npy", mmap_mode="r") for n in meta.pop("arrays", ARRAY_NAMES)}
    out["classes"] = meta.pop("classes")
    out["meta"] = meta
    for split in ("train", "test"):
        n = len(out[f"{split}_x"])
        bad = [k for k, v in out.items() if k.startswith(f"{split}_") and isinstance(v, np.ndarray) and len(v) != n]
        if bad:
            raise DataError(f"the decoded arrays in {target} disagree on the number of {split} images "
                            f"({', '.join(bad)}); delete {target} and run again (the data is decoded again)")
    return out


def _build(cache_root: Path, key: str, decode: Callable[[], dict]) -> None:
    """Decode into a temporary folder and rename it to ``cache_root/key`` when complete."""
    target = cache_root / key
    tmp = cache_root / temp_name(key)
    try:
        try:
            tmp.mkdir(mode=0o777)  # permissions from the umask, like any other folder (mkdtemp's are private)
        except OSError as e:
            raise cache_write_error(e, cache_root) from e
        arrays = decode()
        names = _array_names(arrays)
        try:
            for n in names:
                np.save(tmp / f"{n}.npy", np.ascontiguousarray(arrays[n]))
            meta = {"classes": list(arrays["classes"]), **arrays.get("meta", {}), "arrays": names,
                    "shapes": {n: list(np.shape(arrays[n])) for n in names}}
            (tmp / "meta.json").write_text(json.dumps(meta))
        except OSError as e:
            raise cache_write_error(e, cache_root) from e
        try:
            os.replace(tmp, target)
        except OSError as e:
            if cache_problem(target) is not None:  # else: an older fedlt (no lock) built it meanwhile
                raise cache_write_error(e, cache_root) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def discard(path: Path, name: str) -> None:
    """Move a damaged cache entry out of the way (a hidden temporary name, then removed): readers that still
    have its files open keep them."""
    aside = path.with_name(temp_name(name))
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    except OSError as e:
        raise cache_write_error(e, path.parent) from e
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def cached_arrays(cache_root: Path, key: str, decode: Callable[[], dict]) -> tuple[dict, Path]:
    """Return the arrays cached under ``cache_root/key`` (memory-mapped), decoding them first if absent or
    damaged.

    ``decode()`` returns the four arrays of :data:`ARRAY_NAMES` (plus optional extra ``train_*``/``test_*``
    arrays), ``classes`` and an optional JSON-able ``meta`` dict. Everything is written to a temporary folder
    that is renamed into place only when complete; on any error (or Ctrl-C) the temporary folder is removed.
    """
    target = cache_root / key
    problem = cache_problem(target)
    if problem is not None:
        with cache_lock(cache_root, key):
            remove_stale_temps(cache_root, key, old_style=rf"\.{re.escape(key)}-[a-z0-9_]{{8}}")
            problem = cache_problem(target)  # another process may have built it while this one waited
            if problem is not None:
                if problem != "absent":
                    log.warning("the decoded data in %s is damaged (%s); decoding it again", target, problem)
                    discard(target, key)
                _build(cache_root, key, decode)
    try:
        return _open_cache(target), target
    except (OSError, ValueError) as e:
        raise DataError(f"the decoded data in {target} cannot be read ({e}); delete {target} and run again (the "
                        f"data is decoded again)") from e


# --------------------------------------------------------------------------------------------- Fashion-MNIST
FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
# md5 of the upstream .gz files (the Debian package re-compresses them, so only downloads are checked).
FMNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


def read_idx(path: Path) -> np.ndarray:
    """Decode one (optionally gzipped) IDX file, checking its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != int(np.prod(dims)):
            raise ValueError(f"expected {int(np.prod(dims))} values, found {arr.size}")
        return arr.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise DataError(f"Fashion-MNIST file {path} is corrupt or truncated ({e}); delete it and fetch it again") from e


def _fmnist_dir(data_root: str | None, cache_dir: Path, download: bool, path: str | None = None) -> Path:
    candidates = []
    if path:  # an explicit folder is the only place looked at
        candidates = [Path(os.path.expanduser(path))]
        download = False
    elif data_root:
        candidates += [Path(data_root) / "fashion-mnist", Path(data_root) / "fmnist", Path(data_root)]
    if not path:
        candidates += [FMNIST_SYSTEM_DIR, cache_dir / "downloads" / "fashion-mnist"]
    for d in candidates:
        if all((d / f).exists() or (d / f[:-3]).exists() for f in FMNIST_FILES.values()):
            return d
    if download:
        return download_fmnist(cache_dir / "downloads" / "fashion-mnist")
    raise DataError(
        "Fashion-MNIST was not found (looked in: " + ", ".join(str(c) for c in candidates) + "). Install it with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; the setup script does this), put the four IDX "
        "files in one of those folders (data_root=PATH or dataset.path=PATH), or allow the official download with "
        "dataset.download=true."
    )


def download_fmnist(dest: Path, base_url: str = FMNIST_URL) -> Path:
    """Download the four upstream files with md5 verification (never called by tests against the network)."""
    dest.mkdir(parents=True, exist_ok=True)
    for fname, md5 in FMNIST_MD5.items():
        target = dest / fname
        if target.exists():
            continue
        tmp = dest / (fname + ".part")
        try:
            with urllib.request.urlopen(base_url + fname, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"downloading {base_url + fname} failed ({e}); install dataset-fashion-mnist "
                            f"instead") from e
        got = hashlib.md5(tmp.read_bytes()).hexdigest()
        if got != md5:
            tmp.unlink(missing_ok=True)
            raise DataError(f"checksum mismatch for {fname}: md5 {got}, expected {md5}; the download is corrupt")
        os.replace(tmp, target)
    return dest


def load_fmnist(cfg: dict, data_root: str | None, cache_dir: Path) -> SourceArrays:
    d = _fmnist_dir(data_root, cache_dir, bool(cfg.get("download", False)), cfg.get("path"))
    files = {k: (d / f if (d / f).exists() else d / f[:-3]) for k, f in FMNIST_FILES.items()}

    def decode() -> dict:
        arrays = {k: read_idx(p) for k, p in files.items()}
        for k in ("train_x", "test_x"):
            arrays[k] = arrays[k][..., None]  # N,28,28 -> N,28,28,1
        for k in ("train_y", "test_y"):
            arrays[k] = arrays[k].astype(np.int64)
        if len(arrays["train_x"]) != len(arrays["train_y"]) or len(arrays["test_x"]) != len(arrays["test_y"]):
            raise DataError(f"Fashion-MNIST files in {d} disagree on the number of images and labels")
        arrays["classes"] = FMNIST_CLASSES
        return arrays

    key = "fmnist-" + sha256_files(list(files.values()))[:16]
    arrays, where = cached_arrays(cache_dir / "sources", key, decode)
    return SourceArrays(
        name="fmnist", classes=arrays["classes"], train_x=arrays["train_x"], train_y=arrays["train_y"],
        test_x=arrays["test_x"], test_y=arrays["test_y"], mean=(0.2860,), std=(0.3530,), cache_dir=str(where),
        meta={"files": {k: str(v) for k, v in files.items()}},
    )


def _lazy(module: str, attr: str) -> Callable[[dict, str | None, Path], SourceArrays]:
    """A loader imported on first use (keeps Pillow etc. out of runs that don't need them; no import cycles)."""

    def load(cfg: dict, data_root: str | None, cache_dir: Path) -> SourceArrays:
        import importlib

        return getattr(importlib.import_module(module), attr)(cfg, data_root, cache_dir)

    load.__name__ = attr
    return load


SOURCES: dict[str, Callable[[dict, str | None, Path], SourceArrays]] = {
    "fmnist": load_fmnist,
    "cifar10": _lazy("fedlt.data.cifar", "load_cifar10"),  # official pickles / tar.gz, or an image folder / zip
    "cifar100": _lazy("fedlt.data.cifar", "load_cifar100"),
    "imagefolder": _lazy("fedlt.data.imagefolder", "load_imagefolder"),  # any {train,test}/<class>/<image> data
    "synthetic": _lazy("fedlt.data.synthetic", "load_synthetic"),  # seeded learnable prototypes, 100+ classes
}


def load_source(cfg: dict, data_root: str | None, cache_dir: str | Path) -> SourceArrays:
    """Load the source named by ``cfg['source']``; normalisation statistics come from the config when given
    (``null`` keeps the source's own, e.g. statistics computed from the decoded training images)."""
    name = cfg["source"]
    if name not in SOURCES:
        raise DataError(f"unknown dataset source {name!r}; allowed: {', '.join(sorted(SOURCES))}")
    src = SOURCES[name](cfg, data_root, Path(os.path.expanduser(str(cache_dir))))
    if cfg.get("mean") is not None:
        src.mean = tuple(float(v) for v in cfg["mean"])
    if cfg.get("std") is not None:
        src.std = tuple(float(v) for v in cfg["std"])
    channels = src.train_x.shape[-1]
    if len(src.mean) != channels or len(src.std) != channels:
        raise DataError(f"dataset.mean / dataset.std have {len(src.mean)} / {len(src.std)} values but the images of "
                        f"dataset={cfg.get('name', name)} have {channels} channel(s); give one value per channel "
                        f"(or null to use the statistics of the decoded training images)")
    return src


def open_cached_source(cache_path: str, name: str, mean, std, label_suffix: str = "") -> SourceArrays:
    """Re-open an already decoded source from its cache folder (what client actors do: no search, no hashing).
    ``label_suffix`` selects an alternative label set stored beside the images (``_coarse``)."""
    p = Path(cache_path)
    try:
        meta = json.loads((p / "meta.json").read_text())
        arrays = {n: np.load(p / f"{n}{label_suffix if n.endswith('_y') else ''}.npy", mmap_mode="r")
                  for n in ARRAY_NAMES}
        classes = meta.get(f"classes{label_suffix}", meta["classes"]) if label_suffix else meta["classes"]
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        problem = cache_problem(p)
        problem = "the folder is missing" if problem == "absent" else problem or e
        raise DataError(f"the decoded data in {p} cannot be read ({problem}); delete {p} and run again (the "
                        f"data is decoded again)") from e
    return SourceArrays(name=name, classes=classes, mean=tuple(mean), std=tuple(std), cache_dir=str(p),
                        label_suffix=label_suffix, **arrays)
