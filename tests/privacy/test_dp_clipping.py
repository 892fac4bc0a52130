"""The client's half: every update that leaves a client under client-level DP has L2 norm <= C (the defining
step: fedlt.privacy.clipping.clip_, called by the one client step), local DP adds the configured noise, integer
buffers and non-model uploads never leave the client."""

import math

import pytest
import torch
from flwr.app import ConfigRecord

from fedlt.privacy.clipping import CLIP_KEY, UNCLIPPED, WITHHELD, local_noise_std, protect_update
from fedlt.privacy.server import RunPrivacy
from tests.conftest import needs_fmnist
from tests.core.probe import compose, run_inprocess
from tests.privacy.helpers import TINY, arrays, delta_norm, run_cfg



def rounding(sent: dict[str, torch.Tensor]) -> float:
    """The clipped update is computed in float64 and rounded once to float32 when it is added to the sent arrays:
    at most half an ulp of the largest weight per entry. (The server re-clips in float64, so the sensitivity of
    the noised sum is exactly C; see test_dp_noise.)"""
    floats = [v for v in sent.values() if v.is_floating_point()]
    d = sum(v.numel() for v in floats)
    return math.sqrt(d) * max(float(v.abs().max()) for v in floats) * 2.0 ** -24


def model_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(16, 3, 3, 3, generator=gen), "fc.bias": torch.randn(10, generator=gen),
            "bn.running_var": torch.rand(16, generator=gen) + 0.5,
            "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64)}


@pytest.mark.parametrize("clip_norm", [0.01, 0.5, 3.0])
@pytest.mark.parametrize("scale", [1e-4, 0.1, 10.0])
def test_every_clipped_update_has_norm_at_most_C(clip_norm, scale):
    gen = torch.Generator().manual_seed(int(clip_norm * 100 + scale * 1000))
    sent = model_state(gen)
    trained = {k: (v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 5)
               for k, v in sent.items()}
    before = delta_norm(trained, sent)
    shared = {k: v.clone() for k, v in trained.items()}
    metrics = protect_update(run_cfg(clip_norm=clip_norm), arrays(sent), shared, {}, ConfigRecord({}), 1, 0)
    after = delta_norm(shared, sent)
    assert after <= clip_norm + rounding(sent)
    if before > clip_norm:  # clipped: scaled onto the sphere of radius C, direction kept
        assert after == pytest.approx(clip_norm, abs=rounding(sent))
        assert metrics[UNCLIPPED] == 0.0
        ratio = (shared["conv.weight"].double() - sent["conv.weight"].double()) / \
                (trained["conv.weight"].double() - sent["conv.weight"].double())
        assert torch.allclose(ratio, torch.full_like(ratio, clip_norm / before), rtol=1e-3, atol=1e-3)
    else:  # small updates pass unchanged
        assert metrics[UNCLIPPED] == 1.0
        for k in ("conv.weight", "fc.bias", "bn.running_var"):
            torch.testing.assert_close(shared[k], trained[k])
    # the batch counter (it would reveal the client's number of batches) is the value the server sent
    assert int(shared["bn.num_batches_tracked"]) == 7


def test_clip_norm_comes_from_the_round_config():
    """Adaptive clipping moves C on the server: the client clips to the C in the message."""
    gen = torch.Generator().manual_seed(0)
    sent = model_state(gen)
    shared = {k: v + 1.0 if v.is_floating_point() else v for k, v in sent.items()}
    protect_update(run_cfg(clip_norm=10.0), arrays(sent), shared, {}, ConfigRecord({CLIP_KEY: 0.25}), 1, 0)
    assert delta_norm(shared, sent) == pytest.approx(0.25, abs=rounding(sent))


def test_uploads_besides_the_model_never_leave_the_client():
    gen = torch.Generator().manual_seed(1)
    sent = model_state(gen)
    shared = {k: v.clone() for k, v in sent.items()}
    shared["not.a.model.key"] = torch.ones(3)  # a shared key the server never sent
    uploads = {"creff.grad.weight": torch.ones(4)}
    metrics = protect_update(run_cfg(), arrays(sent), shared, uploads, ConfigRecord({}), 1, 0)
    assert set(shared) == set(sent)
    assert metrics[WITHHELD] == 2.0


def test_unprotected_batchnorm_stats_are_left_out_of_the_update():
    gen = torch.Generator().manual_seed(2)
    sent = model_state(gen)
    shared = {k: v + 10.0 if v.is_floating_point() else v for k, v in sent.items()}
    cfg = run_cfg(clip_norm=0.1, batchnorm_stats="unprotected")
    protect_update(cfg, arrays(sent), shared, {}, ConfigRecord({}), 1, 0, buffers={"bn.running_var"})
    torch.testing.assert_close(shared["bn.running_var"], sent["bn.running_var"] + 10.0)  # sent as trained
    assert delta_norm({k: v for k, v in shared.items() if k != "bn.running_var"}, sent) <= 0.1 + rounding(sent)


def test_local_dp_adds_the_configured_noise_to_the_clipped_update():
    """dp_local (Flower's LocalDpMod): std = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon on every entry."""
    sent = {"w": torch.zeros(200_000)}
    cfg = run_cfg("dp_local", clip_norm=1.0, epsilon=2.0, delta=1e-5)
    shared = {"w": torch.zeros(200_000)}  # no training: what leaves is pure noise
    metrics = protect_update(cfg, arrays(sent), shared, {}, ConfigRecord({}), 4, 2)
    std = 2 * 1.0 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 2.0  # sensitivity null = 2C
    assert local_noise_std(2.0, 2.0, 1e-5) == pytest.approx(std)
    assert shared["w"].double().std().item() == pytest.approx(std, rel=0.01)
    assert abs(shared["w"].double().mean().item()) < 4 * std / math.sqrt(200_000)
    assert UNCLIPPED not in metrics  # an untrusted server gets nothing but the noised update
    again = {"w": torch.zeros(200_000)}
    protect_update(cfg, arrays(sent), again, {}, ConfigRecord({}), 4, 2)
    assert torch.equal(again["w"], shared["w"])  # seeded by (seed, round, client)


@needs_fmnist
def test_real_client_step_sends_only_clipped_updates(tmp_path, monkeypatch):
    """The real round loop and client step on Fashion-MNIST-LT: every reply the server receives is within C of
    the arrays it sent (and some clients did need clipping)."""
    seen = []
    original = RunPrivacy.noised_replies

    def spy(self, rnd, sent, replies):
        start = sent.to_torch_state_dict()
        for r in replies:
            bit = float(next(iter(r.content.metric_records.values()))[UNCLIPPED])
            norm = delta_norm(r.content["arrays"].to_torch_state_dict(), start)
            seen.append((norm, self.round_clip + rounding(start), bit))
        return original(self, rnd, sent, replies)

    monkeypatch.setattr(RunPrivacy, "noised_replies", spy)
    cfg = compose(*TINY, "num_rounds=2", "privacy=dp_central", "privacy.clip_norm=0.5", "privacy.sampling=fixed")
    run_inprocess(cfg, tmp_path / "run")
    assert len(seen) == 4  # 2 clients x 2 rounds
    assert all(norm <= bound for norm, bound, _ in seen)
    assert any(bit == 0.0 for _, _, bit in seen)  # the bound was binding for some client
