"""`fedlt-data`: the summary and figure of a split without training; bad input refused cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedlt.compose import CONFIG_DIR
from fedlt.validate import validate
from fedlt.data_cli import compose_config, main
from tests.conftest import ROOT
from tests.data.conftest import png_bytes

FEDLT_DATA = str(Path(sys.executable).with_name("fedlt-data"))
SYNTH = ["dataset=synthetic_lt", "dataset.num_classes=10", "dataset.train_per_class=30", "dataset.test_per_class=5",
         "dataset.image_size=8", "dataset.imbalance_factor=10", "num_clients=5"]


def run_main(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_and_figure(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing (no run directory, no outputs/) may appear in the working directory
    fig = tmp_path / "figs" / "split.png"
    code, out, err = run_main(capsys, *SYNTH, f"cache_dir={tmp_path / 'cache'}", f"figure={fig}",
                              "hydra.run.dir=ignored")
    assert code == 0, err
    s = json.loads(out)
    for key in ("global_class_counts", "client_train_sizes", "client_class_counts", "client_test_sizes",
                "shot_groups", "imbalance_convention", "local_test_overlap"):
        assert key in s
    assert len(s["client_class_counts"]) == 5 and len(s["client_class_counts"][0]) == 10
    assert fig.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "figs"]


def test_every_dataset_and_partition_config_composes_and_validates():
    datasets = sorted(p.stem for p in (Path(CONFIG_DIR) / "dataset").glob("*.yaml"))
    partitions = sorted(p.stem for p in (Path(CONFIG_DIR) / "partition").glob("*.yaml"))
    assert {"cifar10_lt", "cifar100_lt", "fmnist_lt", "imagefolder", "synthetic_lt"} <= set(datasets)
    pairs = [(d, "dirichlet") for d in datasets] + [("synthetic_lt", p) for p in partitions]
    for d, p in pairs:
        extra = ["dataset.path=/some/where"] if d == "imagefolder" else []
        extra += ["dataset.imbalance_factor=1"] if p == "local_lt" else []  # balanced global data, local tails
        cfg = validate(compose_config([f"dataset={d}", f"partition={p}", *extra]))
        assert cfg["dataset"]["name"] == d and cfg["partition"]["name"] == p


def test_cifar_configs_follow_the_official_protocol():
    c10 = compose_config(["dataset=cifar10_lt"])["dataset"]
    c100 = compose_config(["dataset=cifar100_lt"])["dataset"]
    assert (c10["n_max"], c10["mean"], c10["std"]) == (5000, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (c100["n_max"], c100["mean"], c100["std"]) == (500, [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762])
    for d in (c10, c100):
        assert d["augment"] == {"crop_padding": 4, "hflip": True} and d["download"] is False


def _imagefolder(tmp_path, classes: int) -> Path:
    root = tmp_path / f"img{classes}"
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        (root / f"class{c}" / "0.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    return root


BAD = {
    "alpha_zero": (["partition.alpha=0"], "partition.alpha=0"),
    "alpha_negative": (["partition=dirichlet_per_client", "partition.alpha=-1"], "partition.alpha=-1"),
    "if_below_one": (["dataset.imbalance_factor=0.5"], "dataset.imbalance_factor=0.5"),
    "shards_unsatisfiable": (["partition=shards", "partition.classes_per_client=1", "num_clients=3"], "class slots"),
    "shards_k_too_large": (["partition=shards", "partition.classes_per_client=11"], "between 1 and 10"),
    "too_many_clients": (["num_clients=100000"], "num_clients=100000"),
    "unknown_option": (["partition=iid", "+partition.alpha=0.5"], "partition.alpha"),
    "unknown_dataset": (["dataset=nope"], "nope"),
    "bad_override": (["num_clients=="], "could not be composed"),
    "holdout_fraction": (["eval.local_test=holdout", "eval.holdout_fraction=1.5"], "eval.holdout_fraction=1.5"),
}
ALONE = {  # without the synthetic-data overrides
    "coarse_for_cifar10": (["dataset=cifar10_lt", "+dataset.label_type=coarse"], "dataset.label_type='coarse'"),
    "unknown_dataset_lists_options": (["dataset=nope"], "synthetic_lt"),
}


@pytest.mark.parametrize("case", sorted(BAD) + sorted(ALONE))
def test_bad_input_is_one_clean_paragraph(tmp_path, capsys, case):
    overrides, named = BAD[case] if case in BAD else ALONE[case]
    base = SYNTH if case in BAD else []
    code, out, err = run_main(capsys, *base, f"cache_dir={tmp_path / 'cache'}", *overrides)
    assert code == 2 and out == ""
    assert err.startswith("fedlt-data: error: ") and named in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_data_files_are_clean_errors(tmp_path, capsys):
    cache = tmp_path / "cache"
    checks = [
        ([f"dataset.path={_imagefolder(tmp_path, 1)}"], "at least two classes"),
        ([f"dataset.path={tmp_path}/missing"], "does not exist"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    checks.append(([f"dataset.path={empty}"], "no training images"))
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip")
    checks.append(([f"dataset.path={corrupt}"], "corrupt or truncated"))
    for overrides, named in checks:
        code, out, err = run_main(capsys, "dataset=imagefolder", f"cache_dir={cache}", *overrides)
        assert code == 2 and named in err and err.count("\n") == 1, err
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        for split in ("train", "test"):
            for c in range(2):
                z.writestr(f"{split}/c{c}/0.png", png_bytes(np.zeros((4, 4, 3), np.uint8)))
    code, out, err = run_main(capsys, "dataset=imagefolder", f"cache_dir={cache}", f"dataset.path={good}",
                              "num_clients=2", "partition=iid")
    assert code == 0, err
    s = json.loads(out)
    assert s["classes"] == ["c0", "c1"] and s["client_train_sizes"] == [1, 1]
    code, out, err = run_main(capsys, "dataset=cifar10_lt", f"cache_dir={cache}", f"dataset.path={good}",
                              "dataset.sha256=" + "0" * 64)
    assert code == 2 and "checksum mismatch" in err
    assert not [p for p in (cache / "sources").iterdir() if p.name.startswith(".")]  # no half-written cache


def test_console_script_refuses_bad_input_without_traceback(tmp_path):
    res = subprocess.run([FEDLT_DATA, *SYNTH, f"cache_dir={tmp_path}", "partition.alpha=-0.5"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "partition.alpha=-0.5" in res.stderr
    assert res.stdout == ""


def test_help(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "figure=PATH" in out and "cifar100_lt" in out and "dirichlet_balanced" in out


def test_clients_without_training_or_test_data_are_reported(tmp_path, capsys):
    code, out, err = run_main(capsys, *SYNTH, f"cache_dir={tmp_path / 'cache'}", "num_clients=40",
                              "partition.alpha=0.001")
    assert code == 0, err
    s = json.loads(out)
    empty = s["clients_without_data"]
    no_train = [i for i, n in enumerate(s["client_train_sizes"]) if n == 0]
    no_test = [i for i, n in enumerate(s["client_test_sizes"]) if n == 0]
    assert no_train and empty["no_training_data"] == {"count": len(no_train), "clients": no_train}
    assert empty["no_test_data"] == {"count": len(no_test), "clients": no_test}
    assert err.startswith(f"fedlt-data: warning: {len(no_train)} of 40 clients have no training data (clients "
                          f"{no_train[0]}, ") and "partition.alpha" in err and err.count("\n") == 1, err
    code, out, err = run_main(capsys, *SYNTH, f"cache_dir={tmp_path / 'cache'}")
    assert code == 0 and err == ""
    assert json.loads(out)["clients_without_data"]["no_training_data"] == {"count": 0, "clients": []}


def test_a_decompression_bomb_is_refused_by_the_console_script(tmp_path):
    from tests.data.test_imagefolder import png_header_only, write_folder

    root = write_folder(tmp_path / "data", {"a": 2, "b": 2})
    (root / "train" / "a" / "bomb.png").write_bytes(png_header_only(30000, 30000))
    res = subprocess.run([FEDLT_DATA, "dataset=imagefolder", f"dataset.path={root}", f"cache_dir={tmp_path / 'c'}",
                          "num_clients=2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.startswith("fedlt-data: error: image train/a/bomb.png") and res.stderr.count("\n") == 1
    assert "decompression bomb" in res.stderr


def test_a_read_only_cache_dir_is_one_paragraph(tmp_path, capsys, monkeypatch):
    from tests.data.test_cache import make_read_only

    cache = tmp_path / "ro-cache"
    cache.mkdir()
    make_read_only(monkeypatch, cache)
    code, out, err = run_main(capsys, *SYNTH, f"cache_dir={cache}")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"fedlt-data: error: {cache / 'sources'} is not writable" in err and "cache_dir=PATH" in err
