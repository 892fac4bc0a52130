"""Image folders and zips: ``{train,test}/<class>/<image>`` (or just ``<class>/<image>``), optionally inside one
root folder. Used by the ``imagefolder`` source (any user data set) and by the CIFAR sources for their
image-folder copies (e.g. ``cifar10-jpeg.zip``, ``cifar100-png.zip``).

Images are decoded once with Pillow into uint8 ``N x H x W x C`` arrays and cached by :func:`cached_arrays`.
Within a class, images are taken in sorted file-name order (the CIFAR copies name them by their position in
the official order), so the arrays -- and every split drawn from them -- are the same on every machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedlt.data.sources import DataError, SourceArrays, cached_arrays, sha256_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "test")
DECODER_VERSION = 1  # part of every cache key: bump when decoding changes so stale caches are not reused


class ImageArchive:
    """A folder or a ``.zip`` seen as relative POSIX file names and their bytes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_dir():
            self.names = sorted(
                p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()
            )
        elif self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise DataError(f"{self.path} is not a readable zip archive ({e}): the file is corrupt or truncated; "
                                f"download or copy it again") from e
            self.names = sorted(i.filename for i in self._zip.infolist() if not i.is_dir())
        else:
            raise DataError(f"{self.path} does not exist")

    def read(self, name: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(name)
            return (self.path / name).read_bytes()
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
            raise DataError(f"cannot read {name} from {self.path} ({e}): the archive is corrupt or truncated") from e

    def fingerprint(self) -> str:
        """SHA-256 of a zip's bytes; for a folder, of its file listing with sizes and modification times
        (hashing every image of a large folder on each run would cost more than decoding it)."""
        if self._zip is not None:
            return sha256_file(self.path)
        h = hashlib.sha256()
        for n in self.names:
            st = (self.path / n).stat()
            h.update(f"{n}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


@dataclass
class Layout:
    """What :func:`scan` found: ``images[split][class]`` = sorted member names; ``split`` is ``train``/``test``
    or ``all`` when the data has no split folders; ``extra`` = other files directly under the root."""

    root: str
    images: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def has_splits(self) -> bool:
        return "train" in self.images


def _hidden(parts: list[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def scan(names: list[str]) -> Layout:
    """Find the image layout in a list of relative file names (see the module docstring)."""
    names = [n for n in names if not _hidden(n.split("/"))]
    tops = {n.split("/")[0] for n in names}
    root = ""
    if len(tops) == 1 and any(n.count("/") >= 2 for n in names) and next(iter(tops)) not in SPLITS:
        root = next(iter(tops)) + "/"
    layout = Layout(root=root)
    for n in names:
        parts = n[len(root):].split("/")
        if len(parts) == 1:
            layout.extra[parts[0]] = n
        elif n.lower().endswith(IMAGE_EXTENSIONS):
            if parts[0] in SPLITS and len(parts) >= 3:
                split, cls = parts[0], parts[1]
            else:
                split, cls = "all", parts[0]
            layout.images.setdefault(split, {}).setdefault(cls, []).append(n)
    if layout.has_splits:
        layout.images.pop("all", None)
        if "test" not in layout.images:  # train/ only: treat it as unsplit data (a test split is held out)
            layout.images["all"] = layout.images.pop("train")
    elif "test" in layout.images:  # test/ only: there is nothing to train on
        layout.images = {}
    for per_class in layout.images.values():
        for members in per_class.values():
            members.sort()
    return layout


def decode_images(archive: ImageArchive, members: list[str], size: tuple[int, int] | None,
                  mode: str) -> np.ndarray:
    """Decode ``members`` into one uint8 ``N x H x W x C`` array. ``size`` = (height, width) resizes every
    image (bilinear); ``None`` requires all images to have the same size."""
    from PIL import Image, UnidentifiedImageError

    channels = 1 if mode == "L" else 3
    out: np.ndarray | None = None
    for i, name in enumerate(members):
        data = archive.read(name)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert(mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except Image.DecompressionBombError as e:  # a header claiming more pixels than any data set image has
            reason = str(e).rstrip(".")
            raise DataError(f"image {name} in {archive.path} is refused as a possible decompression bomb ({reason}): "
                            f"decoding it could exhaust the machine's memory. The file is damaged or not an image "
                            f"of a data set; remove it from the data set") from e
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, zlib.error) as e:
            raise DataError(f"image {name} in {archive.path} cannot be decoded ({e}): the file is corrupt or "
                            f"truncated; replace it or remove it from the data set") from e
        arr = arr.reshape(arr.shape[0], arr.shape[1], channels)
        if out is None:
            out = np.empty((len(members), *arr.shape), dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise DataError(f"image {name} in {archive.path} is {arr.shape[1]}x{arr.shape[0]} but earlier images are "
                            f"{out.shape[2]}x{out.shape[1]}; set dataset.image_size to resize all images to one size")
        out[i] = arr
    if out is None:
        return np.zeros((0, *(size or (1, 1)), channels), dtype=np.uint8)
    return out


def decode_split(archive: ImageArchive, per_class: dict[str, list[str]], classes: list[str],
                 size: tuple[int, int] | None, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split, class by class in ``classes`` order."""
    members, labels = [], []
    for label, cls in enumerate(classes):
        files = per_class.get(cls, [])
        members += files
        labels += [label] * len(files)
    return decode_images(archive, members, size, mode), np.asarray(labels, dtype=np.int64)


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1] (computed in chunks: no float copy of all)."""
    c = x.shape[-1]
    n = 0
    s = np.zeros(c)
    s2 = np.zeros(c)
    for start in range(0, len(x), 4096):
        chunk = x[start:start + 4096].reshape(-1, c).astype(np.float64) / 255.0
        s += chunk.sum(0)
        s2 += (chunk * chunk).sum(0)
        n += len(chunk)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 0.0))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def image_size(value) -> tuple[int, int] | None:
    """``dataset.image_size``: null (keep), an int (square) or [height, width]."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


def holdout_by_class(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test) per class: ``round(fraction * n_c)`` test images per class, at least one
    image kept for training (for data without train/ and test/ folders)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.where(labels == c)[0])
        t = min(int(round(fraction * len(idx))), len(idx) - 1)
        test.append(idx[:t])
        train.append(idx[t:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def resolve_path(path: str, data_root: str | None) -> Path:
    """``dataset.path`` as given, or relative to ``data_root`` when it is not found as given."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute() and not p.exists() and data_root:
        q = Path(os.path.expanduser(str(data_root))) / p
        if q.exists():
            return q
    return p


def load_imagefolder(cfg: dict, data_root: str | None, cache_dir: Path) -> SourceArrays:
    """Any image data set as ``{train,test}/<class>/<image>`` or ``<class>/<image>`` (folder or zip). Class
    names are the folder names, sorted; images are resized to ``dataset.image_size``; without split folders
    ``dataset.test_fraction`` of every class is held out as the test split."""
    if not cfg.get("path"):
        raise DataError("dataset=imagefolder needs dataset.path=PATH: a folder or .zip holding {train,test}/<class>/"
                        "<image> or <class>/<image>")
    path = resolve_path(cfg["path"], data_root)
    if not path.exists():
        raise DataError(f"dataset.path={cfg['path']} does not exist (looked at {path})")
    archive = ImageArchive(path)
    try:
        layout = scan(archive.names)
        if not layout.images:
            raise DataError(f"no training images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}; expected "
                            f"{{train,test}}/<class>/<image> or <class>/<image>, optionally inside one root folder")
        first = "train" if layout.has_splits else "all"
        classes = sorted(layout.images.get(first, {}))
        if len(classes) < 2:
            found = f"only the class folder {classes[0]!r}" if classes else "no class folders"
            where = (layout.root + (first + "/" if first != "all" else "")) or "its top level"
            raise DataError(f"{path} has {found} under {where}; classification needs at least two classes (one "
                            f"sub-folder per class)")
        unknown = sorted(set(layout.images.get("test", {})) - set(classes))
        if unknown:
            raise DataError(f"{path}: the test split has classes with no training images: {', '.join(unknown)}")
        size = image_size(cfg.get("image_size"))
        channels = int(cfg.get("channels", 3))
        mode = "L" if channels == 1 else "RGB"
        fraction = float(cfg.get("test_fraction", 0.2))
        split_seed = int(cfg.get("split_seed", 0))
        params = {"size": size, "mode": mode, "v": DECODER_VERSION,
                  **({} if layout.has_splits else {"test_fraction": fraction, "split_seed": split_seed})}
        fingerprint = archive.fingerprint()
        key = "imagefolder-" + hashlib.sha256(
            json.dumps([fingerprint, params], sort_keys=True).encode()).hexdigest()[:16]

        def decode() -> dict:
            if layout.has_splits:
                train_x, train_y = decode_split(archive, layout.images["train"], classes, size, mode)
                test_x, test_y = decode_split(archive, layout.images.get("test", {}), classes, size, mode)
            else:
                x, y = decode_split(archive, layout.images["all"], classes, size, mode)
                tr, te = holdout_by_class(y, fraction, split_seed)
                train_x, train_y, test_x, test_y = x[tr], y[tr], x[te], y[te]
            mean, std = channel_stats(train_x)
            return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": classes,
                    "meta": {"mean": mean, "std": std, "source_path": str(path), "fingerprint": fingerprint,
                             "layout_root": layout.root, "has_splits": layout.has_splits}}

        arrays, where = cached_arrays(cache_dir / "sources", key, decode)
    finally:
        archive.close()
    meta = arrays["meta"]
    return SourceArrays(name="imagefolder", classes=arrays["classes"], train_x=arrays["train_x"],
                        train_y=arrays["train_y"], test_x=arrays["test_x"], test_y=arrays["test_y"],
                        mean=tuple(meta["mean"]), std=tuple(meta["std"]), cache_dir=str(where), meta=meta)
