"""A fast, seeded, learnable synthetic image set for tests and scale experiments (100+ classes).

Every class ``c`` has a prototype image: a low-resolution Gaussian pattern (``prototype_grid`` x
``prototype_grid`` per channel) upsampled bilinearly to the image size, so classes differ in smooth,
position-dependent colour blobs a small CNN picks up in an epoch or two. An image of class ``c`` is
``0.5 + contrast * (prototype_c + noise * N(0, 1))`` per pixel, clipped to [0, 1] and stored as uint8.
``noise`` sets the difficulty. The data set depends only on its own options and ``data_seed`` (not on the run's
``seed``), so runs with different seeds share one data set; it is generated once and cached like a decoded source.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fedlt.data.imagefolder import channel_stats
from fedlt.data.sources import SourceArrays, cached_arrays

GENERATOR_VERSION = 1


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of ``g x g x C`` to ``size x size x C`` (align_corners style, numpy only)."""
    g = grid.shape[0]
    pos = np.linspace(0.0, g - 1.0, size)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, g - 1)
    w = (pos - lo)[:, None]
    rows = grid[lo] * (1 - w)[..., None] + grid[hi] * w[..., None]  # size, g, C
    cols = rows[:, lo] * (1 - w)[None, :, :] + rows[:, hi] * w[None, :, :]  # size, size, C
    return cols


def generate(num_classes: int, train_per_class: int, test_per_class: int, image_size: int, channels: int,
             noise: float, contrast: float, prototype_grid: int, data_seed: int) -> dict:
    """The arrays of the synthetic set (class-sorted; one independent stream per class and split)."""
    seq = np.random.SeedSequence([data_seed, num_classes, image_size, channels, prototype_grid])
    proto_rng = np.random.default_rng(seq.spawn(1)[0])
    grids = proto_rng.standard_normal((num_classes, prototype_grid, prototype_grid, channels))
    protos = np.stack([_upsample(g, image_size) for g in grids]).astype(np.float32)
    out = {}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        x = np.empty((num_classes * n, image_size, image_size, channels), dtype=np.uint8)
        streams = np.random.SeedSequence([data_seed, 1 if split == "train" else 2]).spawn(num_classes)
        for c in range(num_classes):
            rng = np.random.default_rng(streams[c])
            eps = rng.standard_normal((n, image_size, image_size, channels), dtype=np.float32)
            img = 0.5 + contrast * (protos[c][None] + noise * eps)
            x[c * n:(c + 1) * n] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
        out[f"{split}_x"] = x
        out[f"{split}_y"] = np.repeat(np.arange(num_classes, dtype=np.int64), n)
    return out


OPTIONS = {  # option: default (the documented defaults of configs/dataset/synthetic_lt.yaml)
    "num_classes": 100, "train_per_class": 500, "test_per_class": 50, "image_size": 16, "channels": 3,
    "noise": 3.0, "contrast": 0.08, "prototype_grid": 4, "data_seed": 0,
}


def load_synthetic(cfg: dict, data_root: str | None, cache_dir: Path) -> SourceArrays:
    opts = {k: cfg.get(k, v) if cfg.get(k) is not None else v for k, v in OPTIONS.items()}
    ints = ("num_classes", "train_per_class", "test_per_class", "image_size", "channels", "prototype_grid",
            "data_seed")
    opts = {k: (int(v) if k in ints else float(v)) for k, v in opts.items()}
    key = "synthetic-" + hashlib.sha256(json.dumps([opts, GENERATOR_VERSION], sort_keys=True).encode()).hexdigest()[:16]

    def decode() -> dict:
        arrays = generate(**opts)
        mean, std = channel_stats(arrays["train_x"])
        arrays["classes"] = [f"class_{c:0{len(str(opts['num_classes'] - 1))}d}" for c in range(opts["num_classes"])]
        arrays["meta"] = {"mean": mean, "std": std, "options": opts}
        return arrays

    arrays, where = cached_arrays(cache_dir / "sources", key, decode)
    meta = arrays["meta"]
    return SourceArrays(name="synthetic", classes=arrays["classes"], train_x=arrays["train_x"],
                        train_y=arrays["train_y"], test_x=arrays["test_x"], test_y=arrays["test_y"],
                        mean=tuple(meta["mean"]), std=tuple(meta["std"]), cache_dir=str(where), meta=meta)
