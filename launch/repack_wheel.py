"""Make wheels small enough to travel to a machine without network (launch/gpu_check_prepare.sh).

    python launch/repack_wheel.py WHEEL [--drop PREFIX ...] [--drop-suffix SUFFIX ...] [-o OUT]

Rewrites WHEEL without the members under each ``--drop`` prefix (e.g. ``ray/jars/``: Ray's Java workers,
31.8 MB, unused by Python programs) or ending in a ``--drop-suffix`` (e.g. ``.js.map``: source maps of the
dashboard's web page), removes their lines from the wheel's ``*.dist-info/RECORD`` (the other lines, with their
hashes, stay valid: the remaining files are unchanged), and stores every member of 64 KiB or more LZMA-compressed
(zip method 14, which Python's ``zipfile`` -- and so pip -- reads; native libraries shrink ~30 % more than with
the wheel's deflate). The file name (and so the wheel's tags) is kept; OUT defaults to WHEEL, replaced in place.
Prints one JSON line: bytes before and after, members dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from pathlib import Path

LZMA_MIN = 64 * 1024


def repack(wheel: Path, out: Path, drop: list[str], drop_suffix: list[str]) -> dict:
    before = wheel.stat().st_size
    tmp = out.with_name(out.name + ".tmp")
    dropped, dropped_bytes = [], 0
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w") as zout:
        infos = zin.infolist()
        gone = {i.filename for i in infos
                if any(i.filename.startswith(p) for p in drop) or i.filename.endswith(tuple(drop_suffix))}
        records = [i.filename for i in infos  # the wheel's own RECORD (vendored packages have theirs deeper)
                   if i.filename.count("/") == 1 and i.filename.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise SystemExit(f"{wheel}: expected one .dist-info/RECORD, found {records}")
        for i in infos:
            if i.filename in gone:
                dropped.append(i.filename)
                dropped_bytes += i.file_size
                continue
            data = zin.read(i.filename)
            if i.filename == records[0]:
                lines = data.decode().splitlines()
                kept = [ln for ln in lines if ln.split(",", 1)[0] not in gone]
                data = ("\n".join(kept) + "\n").encode()
            info = zipfile.ZipInfo(i.filename, date_time=i.date_time)
            info.external_attr = i.external_attr  # keeps the executable bit of raylet / gcs_server
            info.create_system = i.create_system
            info.compress_type = zipfile.ZIP_LZMA if len(data) >= LZMA_MIN else zipfile.ZIP_DEFLATED
            zout.writestr(info, data, compresslevel=9 if info.compress_type == zipfile.ZIP_DEFLATED else None)
    os.replace(tmp, out)
    return {"wheel": out.name, "bytes_before": before, "bytes_after": out.stat().st_size,
            "dropped_members": len(dropped), "dropped_bytes_uncompressed": dropped_bytes}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path)
    p.add_argument("--drop", action="append", default=[], help="drop members under this prefix (repeatable)")
    p.add_argument("--drop-suffix", action="append", default=[], help="drop members ending so (repeatable)")
    p.add_argument("-o", "--out", type=Path, default=None)
    args = p.parse_args(argv)
    print(json.dumps(repack(args.wheel, args.out or args.wheel, args.drop, args.drop_suffix)), flush=True)


if __name__ == "__main__":
    main()
