"""FedIC: after FedAvg's aggregation the server fine-tunes the FedAvg model, trains the calibration module over the
ensemble of the round's local models, and distils the calibrated ensemble into the global model, all on the
server-held balanced set; with the distillation off it is FedAvg."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fedlt.config import ConfigError
from strategies.fedavg import FedAvgClient
from strategies.fedic import Calibration, FedICClient, Server, ensemble_outputs
from tests.conftest import needs_fmnist
from tests.core.probe import run_inprocess
from tests.strategies._inprocess import assert_resume_is_exact, config, without_time
from tests.strategies.conftest import build, context, reply_from, tiny_cfg, tiny_data, validate_strategy

DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/strategy/fedic.yaml").read_text())
FEW = ("strategy.finetune_steps=3", "strategy.calibration_steps=3", "strategy.distill_steps=3")


def test_defaults_are_the_official_ones_but_the_cpu_budget():
    cpu = {"finetune_steps": 20, "calibration_steps": 20, "distill_steps": 20, "distill_batch_size": 32}
    assert {k: v for k, v in DEFAULTS.items() if k != "name"} == {
        "server_per_class": 100, "server_lr": 1e-3, "weight_decay": 2e-4, "labeled_batch_size": 20,
        "temperature": 2.0, "distill_weight": 0.5, **cpu}  # official: 100 steps per stage, batch 128
    validate_strategy(Server, tiny_cfg(DEFAULTS))
    with pytest.raises(ConfigError, match="server_data.per_class=0 for strategy=fedic"):
        validate_strategy(Server, tiny_cfg(DEFAULTS, server_data={"per_class": 0}))


def test_calibration_module_is_the_official_highway():
    """The official Ensemble_highway, written out client by client for m = 3 models."""
    torch.manual_seed(0)
    cal = Calibration(4, 5)
    with torch.no_grad():
        for p in cal.parameters():
            p.copy_(torch.randn_like(p))
    feats, logits, fedavg = torch.randn(3, 6, 5), torch.randn(3, 6, 4), torch.randn(6, 4)
    w = torch.cat([torch.sigmoid(z @ cal.ensemble_scale + cal.ensemble_bias) for z in logits], dim=1)  # B, m
    w = (w / w.norm(1, dim=1, keepdim=True)).t()
    weighted = sum(wk.view(-1, 1) * z for z, wk in zip(logits, w))
    feature = sum(f / 3 for f in feats)
    gate = torch.sigmoid(cal.gate(feature))
    expected = gate * (weighted * cal.logit_scale + cal.logit_bias) + (1 - gate) * fedavg
    assert torch.allclose(cal(feats, logits, fedavg), expected, atol=1e-6)


def server_round(cfg, rounds_of_local_training: int = 1):
    """A server with a 4-class balanced set and two clients with opposite long tails: (server, FedAvg arrays,
    arrays after the server step, replies)."""
    server = Server(cfg)
    server.server_data = tiny_data((10, 10, 10, 10), seed=5)
    sent = server.initial_arrays(build(FedICClient, cfg))
    replies = []
    for cid, counts in enumerate(((40, 20, 4, 2), (2, 4, 20, 40))):
        m = build(FedICClient, cfg)
        FedAvgClient(cfg).train(context(m, tiny_data(counts, client_id=cid, seed=cid), cfg))
        replies.append(reply_from(m, server, cid, sum(counts)))
    fedavg = server.merge(sent, server.aggregate(1, sent, replies))
    return server, fedavg, server.after_aggregate(1, fedavg, replies), replies


def teacher_gap(server, arrays, replies) -> float:
    """KL(teacher || model) on the server set: how far ``arrays``' predictions are from the calibrated ensemble's."""
    model = build(FedICClient, server.cfg)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    x = server.server_data.normalise(server.server_data.train_x)
    with torch.no_grad():
        locals_ = server._local_models(replies)
        teacher = server._calibration(*ensemble_outputs(locals_, x), server._finetuned(x))
        return float(F.kl_div(F.log_softmax(model(x) / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean"))


def test_distillation_moves_the_global_model_towards_the_calibrated_ensemble():
    strategy = {**DEFAULTS, "finetune_steps": 5, "calibration_steps": 20, "distill_steps": 30, "server_lr": 0.01,
                "distill_weight": 1.0, "distill_batch_size": 40, "labeled_batch_size": 8}
    server, fedavg, distilled, replies = server_round(tiny_cfg(strategy, batch_size=16))
    assert teacher_gap(server, distilled, replies) < 0.5 * teacher_gap(server, fedavg, replies)
    # the calibration module was trained (its scales moved from their initial ones)
    assert not torch.equal(server._calibration.logit_scale.detach(), torch.ones(4))
    # the server state carries the module and the Adam moments
    state = server.server_state()
    assert set(state) == {"calibration", "optimizers"} and state["optimizers"]["distill"]["state"]


def test_without_distillation_the_server_step_is_fedavg():
    strategy = {**DEFAULTS, "finetune_steps": 5, "calibration_steps": 5, "distill_steps": 0}
    server, fedavg, out, _ = server_round(tiny_cfg(strategy, batch_size=16))
    assert out is fedavg
    with_it = server_round(tiny_cfg({**strategy, "distill_steps": 2}, batch_size=16))
    assert any(not torch.equal(torch.as_tensor(a.numpy()), torch.as_tensor(with_it[2][k].numpy()))
               for k, a in fedavg.items())


@needs_fmnist
def test_all_stages_off_is_fedavg_on_the_same_split(tmp_path):
    off = ("strategy.finetune_steps=0", "strategy.calibration_steps=0", "strategy.distill_steps=0")
    fedic, strategy = run_inprocess(config("fedic", *off, rounds=2), tmp_path / "fedic")
    assert strategy.server_data.train_counts.tolist() == [2] * 10  # auto: min(100, 5 // 2) per class
    fedavg, _ = run_inprocess(config("fedavg", "server_data.per_class=2", rounds=2), tmp_path / "fedavg")
    assert without_time(fedic.rows) == without_time(fedavg.rows)
    a, b = fedic.final_arrays.to_torch_state_dict(), fedavg.final_arrays.to_torch_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_fmnist
def test_resume_is_exact_and_needs_the_server_state(tmp_path):
    full, ckpt = assert_resume_is_exact("fedic", tmp_path, "server", *FEW)
    assert ckpt.server_state["calibration"]["logit_scale"].shape == (10,)
    assert ckpt.server_state["optimizers"]["distill"]["state"]  # Adam moments persist across rounds, as officially
