"""FedETF: a fixed K x K simplex ETF (built on the server, sent once, never trained or uploaded), a learnable
projection + L2 normalisation + learnable temperature trained with balanced softmax, and fine-tuning of a copy
for personalization."""

import torch
import torch.nn.functional as F

from fedlt.train.losses import balanced_softmax
from strategies.fedetf import FedETFClient, Server
from tests.strategies.conftest import build, changed, context, snapshot, tiny_cfg, tiny_data

STRATEGY = {"name": "fedetf", "finetune_cycles": 1, "proto_epochs": 1, "proj_epochs": 1, "proto_lr": 0.1,
            "proj_lr": 0.05}
CFG = tiny_cfg(STRATEGY, batch_size=8)


def test_prototypes_form_a_simplex_etf():
    m = build(FedETFClient, CFG).etf.prototypes.detach()
    k = m.shape[0]
    gram = m.T @ m
    assert m.shape == (4, 4)
    assert torch.allclose(gram.diagonal(), torch.ones(k), atol=1e-5)
    off = gram[~torch.eye(k, dtype=bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (k - 1)), atol=1e-5)


def test_etf_is_fixed_sent_once_and_never_uploaded():
    server = Server(CFG)
    arrays = server.initial_arrays(build(FedETFClient, CFG))
    assert set(server.frozen) == {"etf.prototypes"} and "etf.prototypes" not in arrays.keys()
    assert {"projection.weight", "scale"} <= set(arrays.keys())
    model = build(FedETFClient, CFG)
    before = snapshot(model)
    FedETFClient(CFG).train(context(model, tiny_data(), CFG))
    after = snapshot(model)
    assert torch.equal(before["etf.prototypes"], after["etf.prototypes"])
    assert changed(before, after, "projection.") and changed(before, after, "scale")


def test_logits_are_scaled_cosines_to_the_prototypes_and_training_uses_balanced_softmax():
    model = build(FedETFClient, CFG)
    x = tiny_data().test_x
    with torch.no_grad():
        model.scale.fill_(3.0)
        h = F.normalize(model.projection(model.features(x)), dim=1)
        assert torch.allclose(model(x), 3.0 * h @ model.etf.prototypes, atol=1e-6)
    data = tiny_data()
    loss = FedETFClient(CFG).loss_fn(context(model, data, CFG))
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 3])
    assert torch.allclose(loss(z, y), balanced_softmax(data.train_counts.float())(z, y))


def test_personalization_finetunes_prototypes_and_projection_of_a_copy():
    model = build(FedETFClient, CFG)
    before = snapshot(model)
    preds = FedETFClient(CFG).predictors(context(model, tiny_data(), CFG))
    assert list(preds) == ["finetuned", "global"]
    tuned = snapshot(preds["finetuned"])
    assert changed(before, tuned, "etf.") and changed(before, tuned, "projection.")
    assert not changed(before, tuned, "backbone.", params_only=False) and not changed(before, tuned, "scale")
    assert not changed(before, snapshot(model), "", params_only=False)
