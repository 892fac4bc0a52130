"""FedBN: every BatchNorm layer (affine weights and running statistics) stays with its client and is never
uploaded; the rest is averaged as in FedAvg. The layers are moved under ``local_bn.`` without changing the
forward pass."""

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedlt.models import build_model
from strategies.fedbn import LOCAL, FedBNClient, Server
from tests.conftest import needs_fmnist
from tests.strategies import _inprocess
from tests.strategies.conftest import build, context, reply_from, snapshot, tiny_cfg, tiny_data

CFG = tiny_cfg({"name": "fedbn"}, batch_size=8, local_epochs=2, num_clients=2)
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("model_cfg", [{"name": "cnn", "width": 4, "feature_dim": 8}, {"name": "resnet8"}])
def test_batch_norm_layers_move_under_local_bn_and_the_forward_pass_is_unchanged(model_cfg):
    cfg = {**CFG, "model": model_cfg}
    torch.manual_seed(0)
    plain = build_model(model_cfg, 1, 4)
    torch.manual_seed(0)
    fedbn = FedBNClient.build_model(build_model(model_cfg, 1, 4), cfg)
    layers = bn_names(plain)
    assert layers and not bn_names(fedbn.backbone)  # the ResNet's shortcut BatchNorms too
    expected = {f"{LOCAL}.{n.replace('.', '-')}.{s}" for n in layers for s in BN_SUFFIXES}
    keys = set(fedbn.state_dict())
    assert {k for k in keys if k.startswith(LOCAL + ".")} == expected
    # every other key is unchanged, and the BatchNorm keys exist once, under local_bn only
    moved = {f"{n}.{s}" for n in layers for s in BN_SUFFIXES}
    assert keys - expected == set(plain.state_dict()) - moved
    x = torch.randn(6, 1, 8, 8)
    for mode in ("train", "eval"):
        getattr(plain, mode)()
        getattr(fedbn, mode)()
        assert torch.equal(plain(x), fedbn(x))
    assert all(m.training is False for m in fedbn.local_bn.values())


def train_client(cid: int, counts, server, start: dict):
    model = build(FedBNClient, CFG)
    model.load_state_dict(start, strict=False)  # the global arrays, as the core loads them
    ctx = context(model, tiny_data(counts, client_id=cid, seed=cid), CFG)
    FedBNClient(CFG).train(ctx)
    return model, reply_from(model, server, cid, int(sum(counts)))


def test_batch_norm_is_personal_never_uploaded_and_the_rest_is_fedavg():
    server = Server(CFG)
    sent = server.initial_arrays(build(FedBNClient, CFG))
    bn_keys = [k for k in build(FedBNClient, CFG).state_dict() if k.startswith(LOCAL + ".")]
    assert bn_keys and all(FedBNClient.is_personal(k) and not server.is_shared(k) for k in bn_keys)
    assert not any(k.startswith(LOCAL) for k in sent.keys())  # never sent

    (m0, r0), (m1, r1) = (train_client(c, counts, server, sent.to_torch_state_dict())
                                for c, counts in enumerate(((12, 6, 0, 2), (0, 3, 9, 9))))
    # each client's BatchNorm weights and statistics are its own...
    for k in bn_keys:
        if "num_batches" not in k:
            assert not torch.equal(m0.state_dict()[k], m1.state_dict()[k]), k
    # ...and none of it is in the reply, which holds every other key
    for r in (r0, r1):
        uploaded = set(r.content["arrays"].keys())
        assert not any(k.startswith(LOCAL) or "running_" in k or "num_batches" in k for k in uploaded)
        assert uploaded == set(sent.keys())
    # the shared rest is averaged exactly as FedAvg (sample-weighted)
    expected = aggregate_arrayrecords([r0.content, r1.content], "num-examples")
    got = server.aggregate(1, sent, [r0, r1])
    for k in sent.keys():
        np.testing.assert_array_equal(got[k].numpy(), expected[k].numpy())


def test_generic_accuracy_is_not_applicable():
    server = Server(CFG)
    model = build(FedBNClient, CFG)
    metrics, detail = server.generic_metrics(model, torch.zeros(2, 1, 8, 8), torch.zeros(2), 4, 2)
    assert metrics == {"generic/accuracy": None} and "BatchNorm" in detail["not_applicable"]
    assert FedBNClient.personalization_stage(CFG) == "after"


def test_personal_batch_norm_is_what_the_client_predicts_with():
    model = build(FedBNClient, CFG)
    ctx = context(model, tiny_data(), CFG)
    FedBNClient(CFG).train(ctx)
    personal = {k: v for k, v in snapshot(model).items() if FedBNClient.is_personal(k)}
    # the core's next message: initial weights, then global arrays, then the client's personal state
    fresh = build(FedBNClient, CFG)
    before = FedBNClient(CFG).predictors(context(fresh, tiny_data(), CFG))["model"](tiny_data().test_x)
    fresh.load_state_dict(personal, strict=False)
    after = FedBNClient(CFG).predictors(context(fresh, tiny_data(), CFG))["model"](tiny_data().test_x)
    assert not torch.allclose(before, after)


@needs_fmnist
def test_resume_is_exact_and_needs_the_clients_batch_norm(tmp_path):
    full, last = _inprocess.assert_resume_is_exact("fedbn", tmp_path, "clients")
    assert not any(k.startswith(LOCAL) for k in full.final_arrays.keys())
    personal = [recs["fedlt.personal"] for recs in last.clients.values()]
    assert len(personal) >= 2 and all(set(p) and all(k.startswith(LOCAL + ".") for k in p) for p in personal)
    assert full.rows[-1]["generic/accuracy"] is None
