"""Carry CIFAR-10-LT to a machine without network in a third of the size of the image zip, and rebuild there a
zip that fedlt reads exactly like the original (same long-tailed images, same official split).

fedlt keeps, per class, the first n_c of the class's images after one seeded shuffle of their indices
(``fedlt.data.longtail.select_longtail``): which images are kept depends only on the labels, never on the
pixels. So ``pack`` stores only the kept training images (12,406 of 50,000 at IF 100) and all 10,000 test
images, byte for byte (one blob), plus the list of every file name; ``unpack`` rebuilds a zip with every name of
the original in its place, the images nobody uses replaced by one 32x32 black JPEG. Labels, order, the
long-tailed subset, the split and every kept pixel are those of the original zip. What differs: the rebuilt
zip's sha256 (so fedlt caches it under another key) and the training-image statistics recorded in the cache
(unused: ``cifar10_lt`` normalises with fixed ImageNet statistics).

    python launch/cifar10_lt_subset.py pack   SRC.zip  PACKED.zip [--imbalance-factor 100] [--n-max 5000]
    python launch/cifar10_lt_subset.py unpack PACKED.zip FULL.zip

``pack`` needs fedlt and Pillow; ``unpack`` needs only the standard library (it runs before anything is
installed on the GPU machine) and checks the rebuilt zip's sha256 against the one ``pack`` recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

MANIFEST = "fedlt-lt-subset.json"
PLACEHOLDER = "fedlt-placeholder.jpg"
BLOB = "fedlt-images.bin"
DATE = (2020, 1, 1, 0, 0, 0)  # fixed member timestamps: the rebuilt zip is the same bytes on every machine


def _write(z: zipfile.ZipFile, name: str, data: bytes, compress: bool = False) -> None:
    info = zipfile.ZipInfo(name, date_time=DATE)
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    z.writestr(info, data)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(src: Path, out: Path, imbalance_factor: float, n_max: int, longtail_seed: int) -> dict:
    import numpy as np
    from PIL import Image

    from fedlt.data.imagefolder import scan
    from fedlt.data.longtail import longtail_counts, select_longtail

    with zipfile.ZipFile(src) as zsrc:
        names = sorted(i.filename for i in zsrc.infolist() if not i.is_dir())
        layout = scan(names)
        if not layout.has_splits:
            raise SystemExit(f"{src}: expected {{train,test}}/<class>/<image>")
        classes = sorted(layout.images["train"])  # the CIFAR copies' class folders sort into the official order
        members = [m for c in classes for m in layout.images["train"][c]]
        labels = np.concatenate([np.full(len(layout.images["train"][c]), i) for i, c in enumerate(classes)])
        counts = longtail_counts(len(classes), n_max, imbalance_factor, "exp")
        kept = select_longtail(labels, counts, longtail_seed)
        carried = {members[i] for i in kept.tolist()} | set(layout.extra.values())  # extra: e.g. a class list
        carried |= {m for c in classes for m in layout.images["test"][c]}
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, format="JPEG", quality=75)
        full = sorted([n for c in classes for split in ("train", "test") for n in layout.images[split][c]]
                      + list(layout.extra.values()))
        # one blob of the carried images' bytes, in name order (22,406 zip members would cost ~3.5 MB of headers)
        blob, sizes = io.BytesIO(), []
        for n in full:
            data = zsrc.read(n) if n in carried else b""
            blob.write(data)
            sizes.append(len(data))  # 0 = not carried: the placeholder
    manifest = {"source": src.name, "source_sha256": sha256(src), "imbalance_factor": imbalance_factor,
                "n_max": n_max, "longtail_seed": longtail_seed, "counts": counts.tolist(),
                "kept_train": len(kept),
                "names": full, "sizes": sizes}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zout:
        _write(zout, BLOB, blob.getvalue())
        _write(zout, PLACEHOLDER, buf.getvalue())
        _write(zout, MANIFEST, json.dumps(manifest).encode(), compress=True)
    full_zip = out.with_name(out.name + ".rebuilt.tmp")
    manifest["rebuilt_sha256"] = unpack(tmp, full_zip, check=False)["sha256"]
    full_zip.unlink()
    with zipfile.ZipFile(tmp, "a") as zout:  # the expected sha256 of the rebuilt zip, for unpack's check
        _write(zout, MANIFEST + ".sha256", manifest["rebuilt_sha256"].encode())
    tmp.replace(out)
    return {k: v for k, v in manifest.items() if k not in ("names", "sizes")} | {"packed_bytes": out.stat().st_size}


def unpack(packed: Path, out: Path, check: bool = True) -> dict:
    with zipfile.ZipFile(packed) as zp:
        have = set(zp.namelist())
        manifest = json.loads(zp.read(MANIFEST))
        placeholder = zp.read(PLACEHOLDER)
        blob = zp.read(BLOB)
        expected = zp.read(MANIFEST + ".sha256").decode() if check and MANIFEST + ".sha256" in have else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pos = 0
    with zipfile.ZipFile(tmp, "w") as zout:
        for n, size in zip(manifest["names"], manifest["sizes"], strict=True):
            _write(zout, n, blob[pos:pos + size] if size else placeholder)
            pos += size
    digest = sha256(tmp)
    if pos != len(blob) or (expected and digest != expected):
        tmp.unlink()
        raise SystemExit(f"{out}: rebuilt zip has sha256 {digest}, expected {expected}: {packed} is damaged")
    tmp.replace(out)
    return {"path": str(out), "sha256": digest, "source_sha256": manifest["source_sha256"],
            "kept_train": manifest["kept_train"], "members": len(manifest["names"])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("src", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--imbalance-factor", type=float, default=100.0)
    a.add_argument("--n-max", type=int, default=5000)
    a.add_argument("--longtail-seed", type=int, default=0)
    b = sub.add_parser("unpack")
    b.add_argument("packed", type=Path)
    b.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        res = pack(args.src, args.out, args.imbalance_factor, args.n_max, args.longtail_seed)
    else:
        res = unpack(args.packed, args.out)
    print(json.dumps(res), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
