"""On a CUDA GPU: what of a client's local training is bitwise reproducible (README, "Reliability" /
Determinism). The client update is the one fedlt runs (``ClientAlgorithm.train`` on a ``ClientContext`` with the
(seed, round, client) generator) on synthetic images, so no dataset or Flower is needed. Skipped without CUDA.

``python tests/test_reliability_gpu.py OUT.json`` also writes the measured differences. Measured on an NVIDIA
H100 (torch 2.11.0+cu130), largest parameter difference after 2 local epochs: small CNN 0.0 run to run with
default kernels and with deterministic ones, 0.021 GPU vs CPU; ResNet-8 0.137 run to run with default kernels,
0.0 with deterministic ones (``backend.deterministic``), 0.21 GPU vs CPU."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS

import pytest  # noqa: E402
import torch  # noqa: E402

from fedlt.data.federated import ClientData, DataPlan  # noqa: E402
from fedlt.api.client import ClientAlgorithm, ClientContext  # noqa: E402
from fedlt.models import build_model  # noqa: E402
from fedlt.seeding import INIT, TRAIN, derive_seed, torch_generator  # noqa: E402

CFG = {"seed": 1, "local_epochs": 2, "batch_size": 32, "optimizer": {"lr": 0.05, "momentum": 0.9,
                                                                      "weight_decay": 5e-4},
       "loss": {"name": "ce"}, "strategy": {"name": "fedavg"}}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def synthetic_client(channels: int, size: int, n: int = 512, k: int = 10) -> ClientData:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (n, size, size, channels), dtype=torch.uint8, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    plan = DataPlan(source_name="synthetic", source_cache="", split_path="", mean=(0.5,) * channels,
                    std=(0.25,) * channels, num_classes=k, num_clients=1, augment_padding=2, augment_hflip=True)
    counts = torch.bincount(y, minlength=k)
    return ClientData(client_id=0, train_x=x, train_y=y, test_x=x[:8].permute(0, 3, 1, 2).float(), test_y=y[:8],
                      train_counts=counts, test_counts=counts, plan=plan)


def train_once(model_name: str, device: str) -> dict[str, torch.Tensor]:
    channels, size = (1, 28) if model_name == "cnn" else (3, 32)
    torch.manual_seed(derive_seed(1, INIT))
    model = build_model({"name": model_name, "width": 16, "feature_dim": 64}, channels, 10).to(device)
    torch.manual_seed(derive_seed(1, TRAIN, 1, 0))
    ctx = ClientContext(model=model, data=synthetic_client(channels, size), cfg=CFG, round=1,
                        generator=torch_generator(1, TRAIN, 1, 0), device=device)
    ClientAlgorithm(CFG).train(ctx)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def measure(model_name: str) -> dict:
    """Run-to-run differences with default kernels and with deterministic ones, and GPU vs CPU."""
    warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(False)
    default = [train_once(model_name, "cuda") for _ in range(2)]
    torch.use_deterministic_algorithms(True, warn_only=True)  # adaptive_avg_pool2d's backward has no such kernel
    strict = [train_once(model_name, "cuda") for _ in range(2)]
    torch.use_deterministic_algorithms(False)
    cpu = train_once(model_name, "cpu")
    return {"model": model_name, "device": torch.cuda.get_device_name(),
            "default_run_to_run_max_diff": max_diff(*default),
            "deterministic_run_to_run_max_diff": max_diff(*strict),
            "gpu_vs_cpu_max_diff": max_diff(strict[0], cpu)}


@cuda
@pytest.mark.parametrize("model_name", ["cnn", "resnet8"])
def test_gpu_client_update_is_bitwise_reproducible_with_deterministic_kernels(model_name):
    m = measure(model_name)
    assert m["deterministic_run_to_run_max_diff"] == 0.0, m
    assert math.isfinite(m["gpu_vs_cpu_max_diff"]), m  # measured and reported (GPU and CPU kernels differ)


if __name__ == "__main__":
    results = [measure(name) for name in ("cnn", "resnet8")]
    print(json.dumps(results, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
