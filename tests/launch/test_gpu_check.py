"""launch/gpu_check.sh and what it carries: the CPU run of the whole check (e2e), its time boxes and failure
records, the CIFAR-10-LT subset that travels instead of the image zip, and the wheel repacking."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = load("gpu_check")
subset = load("cifar10_lt_subset")
repack_wheel = load("repack_wheel")


# ------------------------------------------------------------------------------------------- the whole check
@pytest.mark.e2e
def test_cpu_check_writes_every_section_and_the_summary(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "FEDLT_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(["bash", "launch/gpu_check.sh", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:], summary)
    assert {k: v["status"] for k, v in summary["sections"].items()} == {
        "install": "skipped", "env": "ok", "a": "ok", "b": "ok", "c": "ok"}
    a = json.loads((out / "a_fractional.json").read_text())
    assert a["rounds"] == 1 and a["num_gpus_per_client"] == 0 and a["nvidia_smi"]["csv"] == "a_nvidia_smi.csv"
    b = json.loads((out / "b_throughput.json").read_text())
    assert b["cells_done"] == 7 and {row["partition"] for row in b["rows"]} == {"iid", "dirichlet0.5"}
    for row in b["rows"]:
        assert row["sequential_updates_per_s"] > 0 and row["batched_updates_per_s"] > 0
        if row["label"].endswith("bf16 autocast"):  # the bf16 step: near the float32 loop, not equal to it
            assert 1e-6 < row["max_abs_weight_diff"] < 0.1, row
        else:
            assert row["max_abs_weight_diff"] < 1e-4  # client batching reproduces the one-client loop
    c = json.loads((out / "c_curves.json").read_text())
    assert c["rows"][0]["round"] == 5 and c["official_setting"] is False
    assert isinstance(c["rows"][0]["fedloge_fedlt"], float) and isinstance(c["rows"][0]["fedavg_fedlt"], float)
    assert (out / "c_runs" / "fedloge" / "metrics.jsonl").exists() and (out / "c_curves.csv").exists()
    text = r.stdout
    assert "== fedlt GPU check (device cpu)" in text and "(b) client updates per second" in text
    assert "(c) official curves (fedlt-repro)" in text and "FedLoGe (SSE-C) authors" in text
    assert (out / "summary.txt").read_text().strip() == text[text.index("== fedlt GPU check"):].strip()


# ------------------------------------------------------------------------- time boxes and failure records
def test_a_section_past_its_time_box_is_stopped(tmp_path):
    t0 = time.monotonic()
    rc, timed_out, _ = gpu_check.run_boxed(["sleep", "60"], tmp_path / "s.log", box_s=1, term_grace_s=2)
    assert timed_out and rc is not None and time.monotonic() - t0 < 20


def test_a_failing_section_is_recorded_and_the_next_ones_run(tmp_path, monkeypatch):
    ran = []

    def boom(sec, box, *a):
        raise RuntimeError("boom")

    def ok(sec, box, *a):
        ran.append(sec.name)
        gpu_check.finish(sec, 0, False)

    def slow(sec, box, *a):
        ran.append(sec.name)
        rc, timed_out, _ = gpu_check.run_boxed([sys.executable, "-c", "print('working'); import time; "
                                                "time.sleep(60)"], sec.log, 1, term_grace_s=2)
        gpu_check.finish(sec, rc, timed_out)

    monkeypatch.setattr(gpu_check, "section_env", ok)
    monkeypatch.setattr(gpu_check, "section_a", boom)
    monkeypatch.setattr(gpu_check, "section_b", slow)
    monkeypatch.setattr(gpu_check, "section_c", ok)
    monkeypatch.setenv("GPU_CHECK_WORK", str(tmp_path / "work"))
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "out")]) == 1
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["sections"]
    assert ran == ["env", "b", "c"]
    assert s["a"]["status"] == "failed" and "RuntimeError: boom" in s["a"]["error"]
    assert s["b"]["status"] == "timeout" and "working" in s["b"]["error"] and s["c"]["status"] == "ok"


# ------------------------------------------------------------------------------- the CIFAR-10-LT subset
def tiny_image_zip(path: Path, per_class: int = 12, classes=("a_cls", "b_cls", "c_cls")) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for split, n in (("train", per_class), ("test", 3)):
            for c in classes:
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                    z.writestr(f"{split}/{c}/{i:04d}.png", buf.getvalue())


def test_the_subset_rebuilds_the_zip_with_the_same_long_tailed_images_and_labels(tmp_path):
    from fedlt.data.imagefolder import ImageArchive, scan
    from fedlt.data.longtail import longtail_counts, select_longtail

    src, packed, full = tmp_path / "src.zip", tmp_path / "packed.zip", tmp_path / "full.zip"
    tiny_image_zip(src)
    info = subset.pack(src, packed, imbalance_factor=4, n_max=12, longtail_seed=0)
    assert info["counts"] == [12, 6, 3] and info["kept_train"] == 21
    assert packed.stat().st_size < src.stat().st_size
    assert subset.unpack(packed, full)["sha256"] == info["rebuilt_sha256"]  # the same bytes on every machine
    a, b = ImageArchive(src), ImageArchive(full)
    la, lb = scan(a.names), scan(b.names)
    assert la.images == lb.images  # every name in its place: same labels, same order
    members = [m for c in sorted(la.images["train"]) for m in la.images["train"][c]]
    labels = np.repeat(np.arange(3), 12)
    kept = select_longtail(labels, longtail_counts(3, 12, 4, "exp"), 0)
    assert all(a.read(members[i]) == b.read(members[i]) for i in kept)
    assert sum(a.read(m) == b.read(m) for m in members) == len(kept)  # the others are placeholders
    assert all(a.read(m) == b.read(m) for c in la.images["test"] for m in la.images["test"][c])


def test_a_damaged_subset_is_refused(tmp_path):
    src, packed = tmp_path / "src.zip", tmp_path / "packed.zip"
    tiny_image_zip(src, per_class=4)
    subset.pack(src, packed, imbalance_factor=2, n_max=4, longtail_seed=0)
    with zipfile.ZipFile(packed) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        for i, data in items:
            if i.filename == subset.BLOB:  # one flipped bit in one image
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            z.writestr(i, data)
    with pytest.raises(SystemExit, match="damaged"):
        subset.unpack(bad, tmp_path / "full.zip")


# ------------------------------------------------------------------------------------------ wheel repack
def fake_wheel(path: Path) -> None:
    files = {"pkg/__init__.py": b"VALUE = 42\n", "pkg/jars/big.jar": os.urandom(1000),
             "pkg/blob.bin": b"x" * 200_000,
             "pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n",
             "pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        b"Tag: py3-none-any\n"}
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("pkg-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")


def test_a_repacked_wheel_drops_the_members_and_their_record_lines_and_pip_installs_it(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    fake_wheel(whl)
    res = repack_wheel.repack(whl, whl, ["pkg/jars/"], [])
    assert res["dropped_members"] == 1
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
        assert z.getinfo("pkg/blob.bin").compress_type == zipfile.ZIP_LZMA
    assert "pkg/jars/big.jar" not in names and "pkg/jars/" not in record and "pkg/__init__.py" in record
    rows = list(csv.reader(io.StringIO(record)))
    assert {r[0] for r in rows} == set(names)  # RECORD lists exactly what the wheel holds
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                        "--target", str(target), str(whl)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", "import pkg; print(pkg.VALUE)"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(target)})
    assert r.stdout.strip() == "42" and not (target / "pkg" / "jars").exists()
