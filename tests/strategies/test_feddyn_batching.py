"""FedDyn under client batching (``backend.client_batching``): its batched hooks (``FedDynClient.batched_terms`` /
``batched_loss`` / ``batched_grads`` / ``batched_begin`` / ``batched_end``) give every client what its own
``train`` gives it -- weights, BatchNorm statistics and counters, and its lambda_i carried from round to round --
on uneven clients (one of 3 images) with per-client alpha_i (adaptive_alpha) and binding gradient clipping; a
hook without one of FedDyn's defining steps is caught; a run with client batching equals the
one-client-per-message run."""

from __future__ import annotations

import pytest
import torch

from fedlt.config import param_defaults
from strategies import feddyn
from strategies.feddyn import LAMBDA, FedDynClient, Server
from tests.core.batching import CFG, both_ways, mismatches

# alpha and the clipping norm chosen so that the linear term, alpha_i and the clipping all move the weights
FEDDYN = {**CFG, "strategy": {"name": "feddyn", **param_defaults(Server.params), "alpha": 0.1,
                              "max_grad_norm": 1.0}}


@pytest.fixture(autouse=True)
def mean_size(monkeypatch):
    # the synthetic clients have no split file: the run's mean client size, so that alpha_i = 0.1 * 11 / n_i
    monkeypatch.setattr(feddyn, "mean_client_size", lambda split_path: 11.0)


def test_batched_feddyn_is_the_sequential_feddyn_client_by_client():
    for rnd, seq, bat in both_ways(Server, FEDDYN, sizes=(21, 9, 3)):
        assert not mismatches(seq, bat), (rnd, mismatches(seq, bat))
        for (_, sa), (_, sb) in zip(seq, bat, strict=True):
            assert set(sb) == set(sa) and all(k.startswith(LAMBDA) for k in sb)  # theta stash removed
            assert any(float(v.abs().max()) > 1e-4 for v in sb.values())  # lambda_i really moved


class NoLinearTerm(FedDynClient):  # alpha_i <w, lambda_i - theta> dropped
    def batched_loss(self, model, x, y, weight, terms):
        return FedDynClient.__mro__[1].batched_loss(self, model, x, y, weight, terms)


class NoClipping(FedDynClient):
    def batched_grads(self, grads, params, terms):
        alpha = terms[self.ALPHA]
        return {n: g + alpha * params[n] if self.LINEAR + n in terms else g for n, g in grads.items()}


class OneAlpha(FedDynClient):  # the weight decay with alpha instead of each client's alpha_i
    def batched_grads(self, grads, params, terms):
        terms = {**terms, self.ALPHA: torch.tensor(float(self.cfg["strategy"]["alpha"]))}
        return super().batched_grads(grads, params, terms)


class NoDecay(FedDynClient):  # alpha_i/2 ||w||^2 dropped
    def batched_grads(self, grads, params, terms):
        return super().batched_grads(grads, params, {**terms, self.ALPHA: torch.zeros(())})


class StaleLambda(FedDynClient):  # lambda_i not updated after training
    def batched_end(self, ctx):
        for k in list(ctx.state):
            if k.startswith(self.THETA):
                del ctx.state[k]


@pytest.mark.parametrize(("mutant", "broken", "rounds"), [
    (NoLinearTerm, "weight", 1), (NoClipping, "weight", 1), (OneAlpha, "weight", 1),
    (NoDecay, "weight", 1), (StaleLambda, "extra state", 1)])
def test_a_hook_without_a_defining_step_is_caught(mutant, broken, rounds):
    """The equivalence check is sharp: dropping the linear term, the clipping, the per-client alpha_i, the
    alpha_i weight decay, or the lambda_i update each breaks it."""
    *_, (_, seq, bat) = both_ways(Server, FEDDYN, rounds=rounds, batched_algo=mutant(FEDDYN))
    wrong = mismatches(seq, bat)
    assert any(broken in m for m in wrong), wrong


def test_a_run_with_client_batching_equals_the_one_client_per_message_run(tmp_path):
    """The real round loop (in process): FedDyn's server aggregates by itself (h from each client's own drift),
    so its cohort replies carry every client's own reply; lambda_i is held per client by the server."""
    from fedlt.core import checkpoint
    from tests.strategies._inprocess import config, run_inprocess

    extra = ("dataset.n_max=200", "strategy.alpha=0.1", "strategy.max_grad_norm=1.0")
    runs = {}
    for batching in ("false", "true"):
        cfg = config("feddyn", *extra, f"backend.client_batching={batching}", "backend.torch_threads=1",
                     "checkpoint.every=2", rounds=2)
        runs[batching], _ = run_inprocess(cfg, tmp_path / batching)
    a, b = (runs[k].final_arrays.to_torch_state_dict() for k in ("false", "true"))
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=5e-3, rtol=1e-2), k
    assert runs["false"].rows[-1]["train/clients"] == runs["true"].rows[-1]["train/clients"]
    ca = checkpoint.latest(tmp_path / "false", config("feddyn", *extra, rounds=2)).clients
    cb = checkpoint.latest(tmp_path / "true", config("feddyn", *extra, "backend.client_batching=true",
                                                     rounds=2)).clients
    assert ca.keys() == cb.keys() and ca
    for cid in ca:
        for name in ca[cid]:
            for k, v in ca[cid][name].items():
                assert torch.allclose(v.double(), cb[cid][name][k].double(), atol=5e-3, rtol=1e-2), (cid, k)
