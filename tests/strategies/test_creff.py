"""CReFF: clients upload per-class classifier gradients (stripped before averaging); the server synthesises
federated features by gradient matching and re-trains a classifier on them, which differs from the FedAvg head
and becomes the generic "creff" predictor."""

import numpy as np
import torch
import torch.nn.functional as F


from strategies.creff import GRAD, CReFFClient, Server, class_gradients, matching_distance
from tests.strategies.conftest import build, context, reply_from, tiny_cfg, tiny_data

STRATEGY = {"name": "creff", "features_per_class": 20, "match_steps": 30, "feature_lr": 0.1,
            "retrain_epochs": 30, "retrain_lr": 0.05, "retrain_batch_size": 32, "grad_repeats": 2,
            "grad_images_per_class": 4}
CFG = tiny_cfg(STRATEGY, batch_size=8, num_clients=2)


def test_closed_form_class_gradients_equal_autograd():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3)
    feats = torch.randn(3, 7, 5)
    gw, gb = class_gradients(feats, head.weight, head.bias)
    for c in range(3):
        loss = F.cross_entropy(head(feats[c]), torch.full((7,), c))
        w, b = torch.autograd.grad(loss, [head.weight, head.bias])
        assert torch.allclose(gw[c], w, atol=1e-6) and torch.allclose(gb[c], b, atol=1e-6)


def test_client_uploads_gradients_of_the_classes_it_holds():
    model = build(CReFFClient, CFG)
    ctx = context(model, tiny_data((12, 6, 0, 2)), CFG)
    CReFFClient(CFG).train(ctx)
    up = ctx.uploads
    assert up[GRAD + "weight"].shape == (4, 4, 8) and up[GRAD + "bias"].shape == (4, 4)
    assert up[GRAD + "present"].tolist() == [1, 1, 0, 1]
    assert up[GRAD + "weight"][2].abs().sum() == 0 and up[GRAD + "weight"][0].abs().sum() > 0
    # a class's CE bias gradient sums to zero (softmax minus one-hot)
    assert torch.allclose(up[GRAD + "bias"].sum(1), torch.zeros(4), atol=1e-6)


def run_server_round():
    server = Server(CFG)
    arrays = server.initial_arrays(build(CReFFClient, CFG))
    replies = []
    for cid, counts in enumerate(((12, 6, 0, 2), (0, 3, 9, 9))):
        model = build(CReFFClient, CFG)
        ctx = context(model, tiny_data(counts, client_id=cid, seed=cid), CFG)
        CReFFClient(CFG).train(ctx)
        replies.append(reply_from(model, server, cid, int(sum(counts)), ctx.uploads))
    uploads = [{k: torch.from_numpy(r.content["arrays"][k].numpy().copy()) for k in r.content["arrays"].keys()
                if k.startswith(GRAD)} for r in replies]
    agg = server.aggregate(1, arrays, replies)
    merged = server.merge(arrays, agg)
    return server, arrays, merged, server.after_aggregate(1, merged, replies), uploads


def test_gradients_are_stripped_and_averaged_over_the_clients_holding_each_class():
    server, sent, merged, _, uploads = run_server_round()
    assert not any(k.startswith(GRAD) for k in merged.keys())
    features = server.federated_features
    assert features.shape == (4 * 20, 8)
    # recompute: class 1 is held by both clients (unweighted mean), class 2 only by client 1
    a, b = uploads
    assert a[GRAD + "present"][1] == b[GRAD + "present"][1] == 1
    expected_1 = (a[GRAD + "weight"][1] + b[GRAD + "weight"][1]) / 2
    expected_2 = b[GRAD + "weight"][2]
    from strategies.creff import pop_class_gradients
    from tests.strategies.conftest import train_reply

    replies = [train_reply(c, 5, {k: v.numpy() for k, v in u.items()}) for c, u in enumerate(uploads)]
    gw, _, held = pop_class_gradients(replies)
    assert torch.allclose(gw[1], expected_1) and torch.allclose(gw[2], expected_2) and held.all()


def test_matching_moves_the_features_towards_the_client_gradients():
    server = Server(CFG)
    torch.manual_seed(0)
    weight, bias = torch.randn(4, 8) * 0.1, torch.zeros(4)
    real_w, real_b = class_gradients(torch.randn(4, 10, 8) + 2.0, weight, bias)
    held = torch.tensor([True, True, False, True])
    server.match_features(weight, bias, real_w, real_b, held)  # initialises the features
    start = server.federated_features.clone()
    syn_w, syn_b = class_gradients(start.view(4, 20, 8), weight, bias)
    before = float(matching_distance(syn_w[held], real_w[held]))
    after = server.match_features(weight, bias, real_w, real_b, held)
    assert after < 0.8 * before
    # class 2 (held by no client) is left alone
    assert torch.equal(server.federated_features.view(4, 20, 8)[2], start.view(4, 20, 8)[2])


def test_retrained_classifier_replaces_the_sent_one_and_differs_from_the_fedavg_head():
    server, sent, merged, final, _ = run_server_round()
    new_w = final["creff_head.weight"].numpy()
    assert not np.allclose(new_w, sent["creff_head.weight"].numpy())
    assert not np.allclose(new_w, merged["head.weight"].numpy())
    np.testing.assert_array_equal(final["head.weight"].numpy(), merged["head.weight"].numpy())
    model = build(CReFFClient, CFG)
    model.load_state_dict(final.to_torch_state_dict(), strict=False)
    preds = server.generic_predictors(model)
    assert list(preds) == ["creff", "fedavg"]
    x = tiny_data().test_x
    with torch.no_grad():
        assert torch.allclose(preds["creff"](x), model.features(x) @ torch.from_numpy(new_w).T
                              + torch.from_numpy(final["creff_head.bias"].numpy()), atol=1e-5)
        assert not torch.allclose(preds["creff"](x), preds["fedavg"](x))
    # it was trained on the federated features: their loss fell from that of its fresh initialisation
    labels, feats = server.feature_labels(4), server.federated_features
    start = server.fresh_classifier(1, 8, 4)
    with torch.no_grad():
        trained = F.cross_entropy(feats @ torch.from_numpy(new_w).T
                                  + torch.from_numpy(final["creff_head.bias"].numpy()), labels)
        assert trained < 0.9 * F.cross_entropy(start(feats), labels)

def test_federated_features_survive_server_state_round_trip():
    server, *_ = run_server_round()
    state = server.server_state()
    other = Server(CFG)
    other.load_server_state(state)
    assert torch.equal(other.federated_features, server.federated_features)


def test_closed_form_retraining_is_plain_sgd_on_cross_entropy():
    from fedlt.seeding import derive_seed
    from strategies.creff import CREFF_STREAM

    server = Server(CFG)
    server.federated_features = torch.randn(4 * 20, 8)
    server.sent_head = (torch.zeros(4, 8), torch.zeros(4))
    got = server.retrain_classifier(3)
    head = server.fresh_classifier(3, 8, 4)
    opt = torch.optim.SGD(head.parameters(), lr=STRATEGY["retrain_lr"])
    g = torch.Generator().manual_seed(derive_seed(CFG["seed"], CREFF_STREAM, 3))
    labels = server.feature_labels(4)
    for _ in range(STRATEGY["retrain_epochs"]):
        perm = torch.randperm(len(labels), generator=g)
        for start in range(0, len(perm), STRATEGY["retrain_batch_size"]):
            idx = perm[start:start + STRATEGY["retrain_batch_size"]]
            opt.zero_grad()
            F.cross_entropy(head(server.federated_features[idx]), labels[idx]).backward()
            opt.step()
    assert torch.allclose(got.weight, head.weight, atol=1e-5) and torch.allclose(got.bias, head.bias, atol=1e-5)
