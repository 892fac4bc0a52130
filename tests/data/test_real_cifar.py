"""The real CIFAR copies in the data folder FEDLT_DATA_ROOT (skipped with a reason when absent): counts, class
order, statistics, and the official FedLoGe client sizes through `fedlt-data`. Each zip is decoded at most once
per machine (the user cache), ~15 s per zip on one core; afterwards these tests take seconds."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
from fedlt.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR100_COARSE_CLASSES
from fedlt.data_cli import inspect_split
from tests.conftest import ROOT, SHARED_DATA
from tests.data.conftest import cifar_cfg, needs_real
from tests.data.test_data_cli import FEDLT_DATA


@needs_real("cifar10")
def test_real_cifar10_zip(real_sources):
    s = real_sources("cifar10")
    assert s.classes == CIFAR10_CLASSES
    assert s.train_x.shape == (50000, 32, 32, 3) and s.test_x.shape == (10000, 32, 32, 3)
    assert np.bincount(s.train_y).tolist() == [5000] * 10 and np.bincount(s.test_y).tolist() == [1000] * 10
    assert s.meta["known_copy"].startswith("cifar10-jpeg.zip")
    assert np.allclose(s.meta["mean"], (0.4913, 0.4821, 0.4465), atol=2e-4)  # the statistics of the official training split
    assert np.allclose(s.meta["std"], (0.2452, 0.2428, 0.2606), atol=2e-4)


@needs_real("cifar100")
def test_real_cifar100_zip_fine_and_coarse(real_sources, real_cache_dir):
    from fedlt.data.sources import load_source

    s = real_sources("cifar100")
    assert s.classes == CIFAR100_CLASSES
    assert len(s.train_y) == 50000 and len(s.test_y) == 10000
    assert np.bincount(s.train_y).tolist() == [500] * 100 and np.bincount(s.test_y).tolist() == [100] * 100
    assert np.allclose(s.meta["mean"], (0.5071, 0.4865, 0.4409), atol=2e-4)
    coarse = load_source(cifar_cfg("cifar100", label_type="coarse"), str(SHARED_DATA), real_cache_dir)
    assert coarse.classes == CIFAR100_COARSE_CLASSES and np.bincount(coarse.train_y).tolist() == [2500] * 20
    assert np.array_equal(coarse.train_x, s.train_x)  # same cached images, other labels


GOLDEN_ARGS = ["dataset.imbalance_factor=100", "partition=dirichlet", "partition.alpha=0.5", "num_clients=40",
               "seed=3407"]


@needs_real("cifar10")
def test_fedlt_data_reproduces_the_official_cifar10_split(real_sources, real_cache_dir):
    real_sources("cifar10")  # decode once (shared with the other tests)
    s = inspect_split(["dataset=cifar10_lt", *GOLDEN_ARGS, f"data_root={SHARED_DATA}",
                       f"cache_dir={real_cache_dir}"])
    assert s["client_train_sizes"][:5] == [215, 141, 207, 171, 243]
    assert s["train_size"] == 12406 and s["global_class_counts"][-1] == 50
    assert s["shot_group_sizes"]["cumulative_75_95"] == {"head": 3, "mid": 3, "tail": 4}  # protocol §5.5


@needs_real("cifar100")
def test_fedlt_data_console_script_reproduces_the_official_cifar100_split(real_sources, real_cache_dir):
    real_sources("cifar100")
    env = {**os.environ, "FEDLT_DATA_ROOT": str(SHARED_DATA), "FEDLT_CACHE_DIR": str(real_cache_dir)}
    res = subprocess.run([FEDLT_DATA, "dataset=cifar100_lt", *GOLDEN_ARGS], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads(res.stdout)
    assert s["client_train_sizes"][:5] == [264, 285, 233, 378, 283]
    assert s["train_size"] == 10847
    sizes = s["client_test_sizes"]
    assert (min(sizes), max(sizes)) == (136, 342)  # protocol §5.4: C100 alpha=0.5 IF=100 local tests 136-342
    assert s["shot_group_sizes"]["cumulative_75_95"] == {"head": 30, "mid": 31, "tail": 39}
    assert s["shot_group_sizes"]["count_100_20"] == {"head": 35, "mid": 35, "tail": 30}
    assert s["local_test_overlap"]["images_in_several_clients"] > 0  # the official rule reuses test images

