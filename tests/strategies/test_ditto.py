"""Ditto: a personal model kept in the client's persistent state, trained with lam/2 ||v - w||^2 towards the
received global model w; the global model is trained as in FedAvg and is the only thing uploaded."""

import torch

from strategies.ditto import PERSONAL, DittoClient, Server
from tests.strategies.conftest import build, context, snapshot, tiny_cfg, tiny_data


def cfg_for(lam: float):
    return tiny_cfg({"name": "ditto", "lam": lam, "personal_epochs": None}, local_epochs=3, batch_size=8)


def personal_distance(lam: float) -> float:
    cfg = cfg_for(lam)
    model = build(DittoClient, cfg)
    received = snapshot(model)
    ctx = context(model, tiny_data(), cfg)
    DittoClient(cfg).train(ctx)
    return float(sum(((ctx.state[PERSONAL + k] - v) ** 2).sum() for k, v in received.items()
                     if "running" not in k and "num_batches" not in k))


def test_proximal_term_keeps_the_personal_model_near_the_received_global():
    free, prox = personal_distance(0.0), personal_distance(5.0)
    assert free > 0 and prox < 0.5 * free


def test_personal_model_persists_and_is_the_personalized_predictor():
    cfg = cfg_for(1.0)
    client, data = DittoClient(cfg), tiny_data()
    model = build(DittoClient, cfg)
    received = snapshot(model)
    ctx = context(model, data, cfg)
    client.train(ctx)
    personal = {k[len(PERSONAL):]: v for k, v in ctx.state.items()}
    assert set(personal) == set(received)
    assert any(not torch.equal(personal[k], model.state_dict()[k]) for k in personal)  # v != trained w
    assert any(not torch.equal(received[k], model.state_dict()[k]) for k in received)  # w trained (FedAvg)
    # the next round starts from the stored personal model, whatever global model arrives
    fresh = build(DittoClient, cfg)
    predictor = client.predictors(context(fresh, data, cfg, rnd=2, state=ctx.state))["personal"]
    assert all(torch.equal(predictor.state_dict()[k], personal[k]) for k in personal)
    # nothing personal is a model key: only w travels
    assert all(Server(cfg).is_shared(k) for k in model.state_dict())


def test_a_client_never_sampled_predicts_with_the_global_model():
    cfg = cfg_for(1.0)
    model = build(DittoClient, cfg)
    predictor = DittoClient(cfg).predictors(context(model, tiny_data(), cfg))["personal"]
    assert all(torch.equal(a, b) for a, b in zip(predictor.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
