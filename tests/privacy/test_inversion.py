"""Gradient inversion (fedlt.privacy.inversion, fedlt-attack --inversion): iDLG reads the label off the last layer's
gradient, DLG/iDLG reconstruct an image from the plain gradient far better than from a DP-noised one (and better
than no matching at all), the DP gradients are built with the run's own clipping / noise code, the metrics are
right on known inputs, and the CLI adds an "inversion" section to attack.json and refuses bad input."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlt.attack import ATTACK_FILE, INVERSION_PNG, main
from fedlt.models import build_model
from fedlt.privacy.clipping import local_noise_std
from fedlt.privacy.inversion import (attacked_parameters, denormalise, infer_labels, invert, label_accuracy,
                                     last_linear, pair, psnr, shared_gradient, ssim)
from tests.conftest import needs_fmnist
from tests.core.probe import compose, run_inprocess
from tests.privacy.helpers import TINY, run_cfg

K = 10
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smoke_cnn(norm: str = "batch"):
    """The smoke CNN's architecture at a test width, as the attack sees it (eval mode)."""
    torch.manual_seed(0)
    model = build_model({"name": "cnn", "width": 8, "feature_dim": 16, "norm": norm}, 3, K).eval()
    return model, [n for n, _ in attacked_parameters(model)]


def image(seed: int = 1, b: int = 1) -> torch.Tensor:
    """Smooth synthetic 32x32 RGB images in [0, 1], normalised with MEAN/STD."""
    low = torch.rand(b, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    img = F.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    return (img - 0.5) / 0.25


def test_metrics_on_known_images():
    x = denormalise(image(b=2), MEAN, STD)
    assert psnr(x, x) == [math.inf, math.inf]
    assert ssim(x, x) == pytest.approx([1.0, 1.0], abs=1e-12)
    y = (x + 0.1).clamp(max=10)  # MSE 0.01 -> 20 dB
    assert psnr(x, y) == pytest.approx([20.0, 20.0], abs=1e-5)  # float32 images
    s = ssim(x, torch.rand(x.shape, generator=torch.Generator().manual_seed(0)))
    assert all(-1.0 <= v < 0.3 for v in s)
    assert 0.0 < ssim(x, x + 0.05)[0] < 1.0
    assert label_accuracy([3, 3, 5], [5, 3, 1]) == pytest.approx(2 / 3)
    xs = denormalise(image(seed=3, b=3), MEAN, STD)
    assert pair(xs, xs[[2, 0, 1]] + 0.01) == [1, 2, 0]  # B > 1: each original gets its own reconstruction
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_idlg_reads_the_label_exactly_without_dp():
    model, names = smoke_cnn()
    x = image()
    for label in range(K):
        g, info = shared_gradient(model, names, x, torch.tensor([label]), None)
        assert info["privacy"] == "none"
        assert infer_labels(g[last_linear(names, model, K)], 1) == [label]
    res = invert(model, names, x, torch.tensor([7]), K, MEAN, STD, None, "idlg", iters=1)
    assert res["labels"] == [7] and res["label_accuracy"] == 1.0
    # a batch of distinct labels: the multiset of negative rows
    xb = image(seed=2, b=3)
    g, _ = shared_gradient(model, names, xb, torch.tensor([4, 0, 9]), None)
    assert sorted(infer_labels(g[last_linear(names, model, K)], 3)) == [0, 4, 9]


def test_reconstruction_needs_the_matching_and_fails_under_dp_noise():
    """iDLG (10 L-BFGS steps) on the plain gradient beats both the dummy it starts from (0 steps: the same seed)
    and the same attack on a DP-SGD gradient with large noise, by several dB; DLG likewise beats its start."""
    model, names = smoke_cnn()
    x, y = image(), torch.tensor([3])
    noisy = run_cfg("dp_sgd", noise_multiplier=10.0, clip_norm=1.0)
    plain = invert(model, names, x, y, K, MEAN, STD, None, "idlg", iters=10)
    start = invert(model, names, x, y, K, MEAN, STD, None, "idlg", iters=0)
    dp = invert(model, names, x, y, K, MEAN, STD, noisy, "idlg", iters=10)
    assert start["steps"] == 0 and plain["steps"] >= 1
    assert plain["psnr"][0] > start["psnr"][0] + 4.0, (plain["psnr"], start["psnr"])
    assert plain["psnr"][0] > dp["psnr"][0] + 4.0, (plain["psnr"], dp["psnr"])
    assert plain["ssim"][0] > dp["ssim"][0] + 0.2 and plain["ssim"][0] > start["ssim"][0] + 0.2
    assert plain["gradient_distance"] < start["gradient_distance"] / 10
    assert dp["protection"]["noise_std"] == pytest.approx(10.0)  # sigma * C / B
    dlg = invert(model, names, x, y, K, MEAN, STD, None, "dlg", iters=10)
    dlg0 = invert(model, names, x, y, K, MEAN, STD, None, "dlg", iters=0)
    assert dlg["psnr"][0] > dlg0["psnr"][0] + 4.0 and dlg["gradient_distance"] < dlg0["gradient_distance"]
    assert set(plain) >= {"psnr", "ssim", "mean_psnr", "mean_ssim", "label_accuracy", "gradient_distance"}


def test_dp_gradients_come_from_the_run_clipping_and_noise():
    model, names = smoke_cnn()
    x, y = image(), torch.tensor([2])
    g, info = shared_gradient(model, names, x, y, None)
    norm = info["gradient_norm"]
    flat = (lambda gs: torch.cat([t.flatten() for t in gs]).double())
    # dp_central: the server sees the clipped one-step update -lr*g; a small update passes unchanged
    big = run_cfg("dp_central", clip_norm=1.0)
    big["optimizer"] = {"lr": 0.5 / norm}
    gc, ic = shared_gradient(model, names, x, y, big)
    assert not ic["clipped"] and torch.allclose(flat(gc), flat(g), rtol=1e-4, atol=1e-7)
    small = run_cfg("dp_central", clip_norm=0.01)
    small["optimizer"] = {"lr": 1.0}
    gc, ic = shared_gradient(model, names, x, y, small)
    assert ic["clipped"] and float(flat(gc).norm()) == pytest.approx(0.01, rel=1e-5)
    assert torch.allclose(flat(gc) * norm / 0.01, flat(g), rtol=1e-3, atol=1e-6)
    # dp_local: clipped, plus Flower LocalDpMod noise of std sens*sqrt(2 ln(1.25/delta))/eps on the update (/lr)
    loc = run_cfg("dp_local", clip_norm=1000.0, epsilon=0.5)
    loc["optimizer"] = {"lr": 0.1}
    gl, il = shared_gradient(model, names, x, y, loc, rnd=2, cid=1)
    want = local_noise_std(2000.0, 0.5, 1e-5) / 0.1
    assert il["noise_std"] == pytest.approx(want)
    assert float((flat(gl) - flat(g)).std()) == pytest.approx(want, rel=0.05)
    gl2, _ = shared_gradient(model, names, x, y, loc, rnd=2, cid=1)
    assert torch.equal(flat(gl), flat(gl2))  # the client's seeded stream
    # dp_sgd with no noise: one image's gradient clipped to C (Opacus's factor C / (norm + 1e-6))
    sgd = run_cfg("dp_sgd", clip_norm=0.1, noise_multiplier=0.0)
    gs, is_ = shared_gradient(model, names, x, y, sgd)
    assert is_["clipped"] == [True] and is_["per_sample_norms"][0] == pytest.approx(norm, rel=1e-4)
    assert torch.allclose(flat(gs), flat(g) * 0.1 / (norm + 1e-6), rtol=1e-4, atol=1e-7)


@needs_fmnist
def test_cli_adds_an_inversion_section_and_refuses_bad_input(tmp_path, capsys):
    cfg = compose(*TINY, "strategy=fedavg", "num_rounds=1", "privacy=dp_sgd", "model.norm=group")
    run = tmp_path / "run"
    run_inprocess(cfg, run)
    base = [str(run), "--max-members", "60", "--no-personal"]
    for args, words in ((["--inversion", "--inversion-images", "9"], "--inversion-images=9"),
                        (["--inversion", "--inversion-iters", "0"], "--inversion-iters=0"),
                        (["--inversion", "--inversion-client", "-1"], "--inversion-client=-1"),
                        (["--inversion", "--inversion-client", "4"], "this run has 4 clients"),
                        (["--inversion-iters", "5"], "add --inversion")):
        with pytest.raises(SystemExit) as e:
            main(base + args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not (run / ATTACK_FILE).exists()

    main(base + ["--inversion", "--inversion-iters", "2", "--inversion-client", "1", "--inversion-png"])
    res = json.loads((run / ATTACK_FILE).read_text())
    assert res["global"]["n_members"] >= 1  # membership inference as before
    inv = res["inversion"]
    assert inv["client"] == 1 and inv["images"] == 1 and inv["method"] == "idlg" and inv["iterations"] == 2
    assert set(inv["cases"]) == {"none", "dp_sgd"}
    for case in inv["cases"].values():
        assert case["steps"] <= 2 and len(case["psnr"]) == len(case["ssim"]) == 1
        assert np.isfinite(case["mean_psnr"]) and -1 <= case["mean_ssim"] <= 1
        assert case["label_accuracy"] in (0.0, 1.0) and "_original" not in case
    assert inv["cases"]["none"]["label_accuracy"] == 1.0  # iDLG's label rule on a real client image
    assert inv["cases"]["dp_sgd"]["protection"]["noise_multiplier"] == 1.0
    assert (run / INVERSION_PNG).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "gradient inversion (idlg, client 1" in out and "dp_sgd" in out

    with pytest.raises(SystemExit) as e:  # the same no-overwrite rule
        main(base + ["--inversion", "--inversion-iters", "1"])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
