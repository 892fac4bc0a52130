"""Gradient inversion: reconstruct a client's training images from the gradient it shares (the library half of
``fedlt-attack RUN_DIR --inversion``; the run-loading CLI is :mod:`fedlt.attack`).

Threat model: an honest-but-curious server sees one client's update of ONE local SGD step (FedSGD) on a batch of
B of its training images, computed on the global model it sent; it knows the model, the learning rate and the
privacy settings, so it turns the update back into a gradient (``g = -update / lr``; DP-SGD's weight decay and
first-step momentum are data-free and public). The shared gradient is what fedlt's client step would send:

* ``none``: the exact gradient of the mean cross-entropy of the B images w.r.t. every shared trainable parameter
  (:meth:`ClientAlgorithm.is_shared`; personal parts never leave the client and are not matched).
* ``dp_central``: the one-step update clipped to L2 norm C by :func:`fedlt.privacy.clipping.protect_update` (the
  client step's own code). The server adds its noise to the SUM of the clipped updates only; the server, the
  attacker here, sees each clipped update in the clear: clipping alone is all that stands in its way (an update
  of norm lr*|g| < C passes unchanged). With adaptive clipping C is the checkpoint's C of the next round.
* ``dp_local``: clipped to C and Gaussian noise added on the client, again by ``protect_update`` (noise stream of
  (run seed, round = checkpoint round + 1, client), as the client would draw it in its next round).
* ``dp_sgd``: one DP-SGD step of :mod:`fedlt.privacy.dp_sgd` on the B images as the whole batch: per-sample
  gradients clipped to C, N(0, (sigma_k C)^2) on their sum (sigma_k: the client's noise multiplier, calibrated
  for its n_k samples where ``target_epsilon`` is set), divided by B (the expected batch size of a batch that
  is these B images).

Reconstruction (Zhu et al., NeurIPS 2019, "Deep Leakage from Gradients", DLG; Zhao et al. 2020, "iDLG: Improved
Deep Leakage from Gradients"): dummy images x' ~ N(0, 1) (and for DLG dummy label logits ~ N(0, 1), soft labels
softmax(.)) are optimised with ``torch.optim.LBFGS`` (lr 1, PyTorch's defaults otherwise: up to 20 inner
iterations per step) to minimise the L2 gradient distance ``sum_layers |grad(x', y') - g|^2`` (the gradient of
x' taken with ``create_graph=True``). DLG's loss is the soft-label cross-entropy ``mean_i sum_c -y'_ic log
softmax(f(x'_i))_c``. iDLG reads the label from the shared gradient first: the gradient of the last linear
layer's weight row c is (p_c - y_c) * features, and the features are non-negative (post-ReLU), so the row sum is
negative exactly for the true class: label = argmin_c sum_j dW_cj; then only x' is optimised with the hard label.
Optimisation stops after ``iters`` steps, or earlier when the distance falls below 1e-6 (iDLG's convergence
test) or becomes non-finite (then the last finite x' is kept and ``diverged`` is reported).

Checked against the official code (facts only, nothing copied): mit-han-lab/dlg at
d21007fa1540ba2303ebc034976aa331814727c7, ``main.py`` (dummy data and label ``torch.randn``, ``LBFGS([dummy_data,
dummy_label])`` with the default lr 1, 300 ``optimizer.step(closure)`` calls, closure = soft-label cross-entropy
``utils.py: cross_entropy_for_onehot`` of ``softmax(dummy_label)``, ``autograd.grad(..., create_graph=True)``,
``sum((gx - gy) ** 2)`` over the layers); PatrickZH/Improved-Deep-Leakage-from-Gradients at
975bce8b41c4611cbda44fddd50778d88bd1de9c, ``iDLG.py`` (lr 1.0, Iteration 300, ``num_dummy`` 1, iDLG optimises
only the data with ``CrossEntropyLoss`` against ``argmin(sum(original_dy_dx[-2], -1))``, break when the loss is
< 1e-6, DLG's label = argmax of the dummy label, MSE as the metric).

Deviations and choices, and why:

* Models: the run's own CNN / ResNet at the checkpoint's global weights, not the papers' randomly initialised
  sigmoid LeNet (uniform(-0.5, 0.5) weights), and its own input normalisation: x' lives in the normalised space
  the model reads. ReLU/max-pool networks are much harder to invert than a sigmoid LeNet, so expect lower
  quality than the papers' figures.
* BatchNorm: the gradient is taken in eval mode (BatchNorm normalises with the checkpoint's running statistics),
  so that one image's gradient does not depend on the other images of the batch, the setting DLG assumes (its
  LeNet has no BatchNorm). fedlt's real client trains in train mode (batch statistics); with ``model.norm=group``
  (required by ``dp_sgd``) there is nothing to choose. The running statistics are therefore not part of the
  update here (they do not change in eval mode).
* The loss is plain cross-entropy with the labels the client trains on (noisy ones under label noise), whatever
  ``loss=`` the run used (both papers use cross-entropy); no data augmentation.
* B > 1 with iDLG (the paper is for one image): the labels are the classes with a negative row sum, the most
  negative first, B of them; when fewer than B are negative, the most negative class fills the rest (repeats).
  Labels are scored as multisets (label_accuracy = |inferred & true| / B, order-free).
* B > 1 reconstructions are paired with the originals by the assignment that maximises the summed PSNR
  (Hungarian, scipy) before they are scored: the order of x' is arbitrary.
* Metrics: PSNR and SSIM on de-normalised images clipped to [0, 1] (data range 1), per image. SSIM is Wang et
  al. 2004 written here with ``torch.nn.functional.conv2d`` (scikit-image is not installed): 11x11 Gaussian
  window of std 1.5, K1 = 0.01, K2 = 0.03, "valid" filtering (no padding, as Wang et al.'s ssim.m), the map
  averaged over positions and channels. PSNR of identical images is +inf (JSON: null).
* ``iters`` can be lowered for CPU (default: the official 300).

A library module: torch, numpy, scipy and :mod:`fedlt.privacy` (clipping, dp_sgd, params).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.privacy.params import CENTRAL, DPSGD, LOCAL, NONE
from fedlt.privacy.params import mode as privacy_mode

METHODS = ("dlg", "idlg")
OFFICIAL_ITERS = 300  # both official scripts: 300 L-BFGS steps
LR = 1.0  # both official scripts: L-BFGS lr 1
CONVERGED = 1e-6  # iDLG's stop: gradient distance below this
MAX_IMAGES = 8


# ------------------------------------------------------------------------------------------ metrics
def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> list[float]:
    """Per image (N,C,H,W): 10 log10(data_range^2 / MSE); +inf for identical images."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return [math.inf if m == 0 else 10.0 * math.log10(data_range ** 2 / m) for m in mse.tolist()]


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> list[float]:
    """Per image (N,C,H,W): SSIM of Wang et al. 2004 with a Gaussian window, valid filtering, averaged over the
    map and the channels (in float64)."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {tuple(x.shape[-2:])}")
    w = _gaussian_window(size, sigma).to(x.device).expand(c, 1, size, size).contiguous()
    filt = (lambda t: F.conv2d(t, w, groups=c))
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).tolist()


def denormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised N,C,H,W -> pixel intensities clipped to [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def pair(originals: torch.Tensor, recon: torch.Tensor) -> list[int]:
    """perm with recon[perm[i]] the reconstruction scored against originals[i] (max summed PSNR)."""
    from scipy.optimize import linear_sum_assignment

    b = originals.shape[0]
    if b == 1:
        return [0]
    score = np.array([[min(p, 1e3) for p in psnr(originals[i:i + 1].expand_as(recon), recon)] for i in range(b)])
    rows, cols = linear_sum_assignment(-score)
    return [int(c) for _, c in sorted(zip(rows, cols, strict=True))]


def label_accuracy(inferred, true) -> float:
    """|multiset(inferred) & multiset(true)| / len(true)."""
    a = np.bincount(np.asarray(inferred, dtype=np.int64), minlength=1)
    b = np.bincount(np.asarray(true, dtype=np.int64), minlength=1)
    n = max(len(a), len(b))
    a, b = np.pad(a, (0, n - len(a))), np.pad(b, (0, n - len(b)))
    return float(np.minimum(a, b).sum() / max(len(true), 1))


# ------------------------------------------------------------------------------------------ gradients
def soft_cross_entropy(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """DLG's loss for soft labels: mean_i sum_c -soft_ic log softmax(logits_i)_c."""
    return torch.mean(torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=1))


def attacked_parameters(model: nn.Module, shared=None) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters a client uploads (``shared(name)``: :meth:`ClientAlgorithm.is_shared`)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and (shared is None or shared(n))]


def gradient(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             create_graph: bool = False) -> list[torch.Tensor]:
    """Gradient of the mean cross-entropy (hard labels ``y`` (long) or soft ``y`` (float, rows sum to 1))."""
    logits = model(x)
    loss = F.cross_entropy(logits, y) if not y.is_floating_point() else soft_cross_entropy(logits, y)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def shared_gradient(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, cfg: dict | None,
                    rnd: int = 1, cid: int = 0, num_samples: int | None = None,
                    clip_norm: float | None = None) -> tuple[list[torch.Tensor], dict]:
    """The gradient the server recovers from the client's one-step update (module docstring), w.r.t. the
    parameters ``names`` of ``model`` (in eval mode), and what protected it. ``cfg``: the run config (its
    ``privacy`` and ``optimizer.lr``, ``seed``); None or ``privacy=none``: the plain gradient. ``num_samples``:
    the client's training-set size (sets DP-SGD's calibrated sigma; default B). ``clip_norm``: client-level C of
    the round when adaptive clipping moved it (sent to the client as the round's config; default
    ``privacy.clip_norm``)."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    m = privacy_mode(cfg) if cfg is not None else NONE
    info: dict = {"privacy": m}
    if m == DPSGD:
        from fedlt.privacy.dp_sgd import (NOISE_STREAM, clip_and_sum, clip_factors, noise_multiplier, noised_mean,
                                          per_sample_grads)
        from fedlt.seeding import PRIVACY, derive_seed

        p = cfg["privacy"]
        clip = float(p["clip_norm"])
        sigma = noise_multiplier(cfg, int(num_samples or x.shape[0]))
        fixed = {k: v.detach() for k, v in model.named_parameters() if k not in names}
        fixed.update(dict(model.named_buffers()))
        g, _ = per_sample_grads(model, names, fixed, F.cross_entropy, x, y)
        _, norms = clip_factors(g, clip)
        summed = clip_and_sum(g, clip)
        gen = torch.Generator(device=x.device).manual_seed(
            derive_seed(int(cfg["seed"]), PRIVACY, rnd, cid, NOISE_STREAM))  # the client's DP-SGD noise stream
        out = [noised_mean(summed[n], sigma, clip, float(x.shape[0]), gen).float() for n in names]
        info.update(clip_norm=clip, noise_multiplier=sigma, per_sample_norms=norms.tolist(),
                    clipped=[bool(v > clip) for v in norms.tolist()],
                    noise_std=sigma * clip / x.shape[0], expected_batch=int(x.shape[0]))
        return out, info
    g = [t.detach() for t in gradient(model, params, x, y)]
    info["gradient_norm"] = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g))
    if m == NONE:
        return g, info
    if m not in (CENTRAL, LOCAL):
        raise ValueError(f"unknown privacy mode {m!r}")
    # client-level DP: the one-step update -lr*g, protected by the client step's own code
    from flwr.app import Array, ArrayRecord

    from fedlt.privacy.clipping import CLIP_KEY, client_sensitivity, local_noise_std, protect_update

    lr = float(cfg["optimizer"]["lr"])
    # the update is taken relative to a zero base (sent = 0, shared = update): the same update and the same
    # clipping/noise as relative to the global weights, without the float32 rounding of weights + update
    sent = ArrayRecord({n: Array(np.zeros(tuple(named[n].shape), dtype=np.float32)) for n in names})
    shared = {n: (-lr * t).float().cpu() for n, t in zip(names, g, strict=True)}
    p = cfg["privacy"]
    c = float(p["clip_norm"]) if clip_norm is None else float(clip_norm)
    protect_update(cfg, sent, shared, {}, {CLIP_KEY: c}, rnd, cid)
    info.update(lr=lr, clip_norm=c, update_norm=lr * info["gradient_norm"],
                clipped=bool(lr * info["gradient_norm"] > c))
    if m == LOCAL:
        info["noise_std"] = local_noise_std(client_sensitivity(p), float(p["epsilon"]), float(p["delta"])) / lr
    else:
        info["note"] = ("the server sees the clipped update; its noise protects only the released sum")
    return [(-shared[n] / lr).to(x.device) for n in names], info


def infer_labels(last_weight_grad: torch.Tensor, b: int) -> list[int]:
    """iDLG: classes with negative row sums of the last linear layer's weight gradient, most negative first
    (B = 1: the official argmin); the most negative repeats when fewer than B rows are negative."""
    s = last_weight_grad.double().sum(dim=-1)
    order = torch.argsort(s).tolist()
    neg = [c for c in order if s[c] < 0][:b]
    if not neg:
        neg = order[:1]
    return neg + [neg[0]] * (b - len(neg))


def last_linear(names: list[str], model: nn.Module, num_classes: int) -> int:
    """Index in ``names`` of the last (num_classes x d) weight: the classifier whose gradient iDLG reads."""
    named = dict(model.named_parameters())
    hits = [i for i, n in enumerate(names) if named[n].ndim == 2 and named[n].shape[0] == num_classes]
    if not hits:
        raise ValueError("iDLG reads the label from the gradient of the last linear layer (num_classes x d), and "
                         "the shared parameters have none (a personal head?); use --inversion-method dlg")
    return hits[-1]


# ------------------------------------------------------------------------------------------ reconstruction
def reconstruct(model: nn.Module, names: list[str], target: list[torch.Tensor], shape: tuple, num_classes: int,
                method: str = "idlg", iters: int = OFFICIAL_ITERS, seed: int = 0,
                labels: list[int] | None = None) -> dict:
    """Optimise dummy images (and DLG's dummy labels) with L-BFGS to match ``target`` (module docstring).
    Returns x' (normalised space), the labels (iDLG: inferred, or ``labels`` when given; DLG: argmax of the soft
    labels), the final gradient distance, the steps taken, whether it converged / diverged."""
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; allowed: {', '.join(METHODS)}")
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    target = [t.detach() for t in target]
    dev = target[0].device
    gen = torch.Generator().manual_seed(int(seed))
    b = int(shape[0])
    dummy = torch.randn(tuple(shape), generator=gen).to(dev).requires_grad_(True)
    if method == "dlg":
        dummy_label = torch.randn((b, num_classes), generator=gen).to(dev).requires_grad_(True)
        opt = torch.optim.LBFGS([dummy, dummy_label], lr=LR)
    else:
        if labels is None:
            labels = infer_labels(target[last_linear(names, model, num_classes)], b)
        hard = torch.tensor(labels, dtype=torch.long, device=dev)
        opt = torch.optim.LBFGS([dummy], lr=LR)

    def distance(create_graph: bool) -> torch.Tensor:
        y = F.softmax(dummy_label, dim=-1) if method == "dlg" else hard
        g = gradient(model, params, dummy, y, create_graph=create_graph)
        return sum(((gx - gy) ** 2).sum() for gx, gy in zip(g, target, strict=True))

    def closure():
        opt.zero_grad()
        d = distance(True)
        d.backward()
        return d

    last_good = dummy.detach().clone()
    steps, diverged, converged = 0, False, False
    for _ in range(int(iters)):
        opt.step(closure)
        steps += 1
        # evaluated after every step, as iDLG's loop calls closure() (no create_graph needed here)
        d = float(distance(False).detach()) if torch.isfinite(dummy).all() else math.nan
        if not math.isfinite(d) or (method == "dlg" and not torch.isfinite(dummy_label).all()):
            diverged = True
            break
        last_good = dummy.detach().clone()
        if d < CONVERGED:
            converged = True
            break
    with torch.no_grad():
        dummy.copy_(last_good)
    final = float(distance(False).detach())
    if method == "dlg":
        labels = dummy_label.detach().argmax(dim=-1).tolist() if torch.isfinite(dummy_label).all() else [-1] * b
    if not math.isfinite(final):
        diverged = True
    converged = converged or final < CONVERGED
    return {"images": dummy.detach(), "labels": [int(v) for v in labels], "gradient_distance": final,
            "steps": steps, "converged": converged, "diverged": diverged}


def invert(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, num_classes: int, mean, std,
           cfg: dict | None = None, method: str = "idlg", iters: int = OFFICIAL_ITERS, seed: int = 0,
           rnd: int = 1, cid: int = 0, num_samples: int | None = None, clip_norm: float | None = None) -> dict:
    """The whole attack on one batch (x normalised N,C,H,W; y the labels): the shared gradient under ``cfg``'s
    privacy mode, the reconstruction, and per image PSNR / SSIM against the originals (de-normalised, [0, 1])."""
    t0 = time.monotonic()
    model.eval()
    target, info = shared_gradient(model, names, x, y, cfg, rnd, cid, num_samples, clip_norm)
    res = reconstruct(model, names, target, tuple(x.shape), num_classes, method, iters, seed)
    orig, rec = denormalise(x.detach(), mean, std), denormalise(res["images"], mean, std)
    perm = pair(orig, rec)
    rec = rec[perm]
    p, s = psnr(orig, rec), ssim(orig, rec)
    true = [int(v) for v in y.tolist()]
    finite = [v for v in p if math.isfinite(v)]
    return {
        "method": method, "images": int(x.shape[0]), "iterations": int(iters), "steps": res["steps"],
        "protection": info, "true_labels": true, "labels": res["labels"],
        "label_accuracy": label_accuracy(res["labels"], true),
        "psnr": p, "ssim": s,
        "mean_psnr": (float(np.mean(finite)) if len(finite) == len(p) else math.inf),
        "mean_ssim": float(np.mean(s)),
        "gradient_distance": res["gradient_distance"], "converged": res["converged"], "diverged": res["diverged"],
        "time_s": time.monotonic() - t0,
        "_original": orig.cpu(), "_reconstruction": rec.cpu(),  # for the PNG grid; not written to JSON
    }
