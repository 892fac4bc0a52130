"""FedPer: the head is personal (never uploaded), the body shared; the generic model uses the average of the
personal heads, which no client ever predicts with."""

import numpy as np
import torch
from flwr.app import ArrayRecord

from strategies.fedper import FedPerClient, Server
from tests.strategies.conftest import build, changed, context, reply_from, snapshot, tiny_cfg, tiny_data

CFG = tiny_cfg({"name": "fedper"})


def test_head_is_personal_and_published_for_the_generic_average():
    server = Server(CFG)
    model = build(FedPerClient, CFG)
    assert not server.is_shared("head.weight") and server.is_shared("averaged_head.weight")
    assert server.is_shared("backbone.body.0.weight")
    before = snapshot(model)
    FedPerClient(CFG).train(context(model, tiny_data(), CFG))
    after = snapshot(model)
    assert changed(before, after, "head.") and changed(before, after, "backbone.")
    assert torch.equal(after["averaged_head.weight"], after["head.weight"])


def test_generic_predictor_is_body_plus_the_weighted_average_of_personal_heads():
    server = Server(CFG)
    server.initial_arrays(build(FedPerClient, CFG))
    models = []
    for cid, counts in enumerate(((12, 6, 0, 2), (0, 3, 9, 9))):
        m = build(FedPerClient, CFG)
        FedPerClient(CFG).train(context(m, tiny_data(counts, client_id=cid, seed=cid), CFG))
        models.append(m)
    replies = [reply_from(m, server, c, n) for c, (m, n) in enumerate(zip(models, (20, 21)))]
    agg = server.aggregate(1, ArrayRecord(), replies)
    expected = (20 * models[0].head.weight + 21 * models[1].head.weight) / 41
    np.testing.assert_allclose(agg["averaged_head.weight"].numpy(), expected.detach().numpy(), rtol=1e-5)
    assert "head.weight" not in agg
    model = build(FedPerClient, CFG)
    model.load_state_dict(agg.to_torch_state_dict(), strict=False)
    x = tiny_data().test_x
    generic = server.generic_predictors(model)["averaged_head"](x)
    assert torch.allclose(generic, model.averaged_head(model.features(x)))
    assert not torch.allclose(generic, model(x))  # the (untrained) personal head of this model differs
