"""FedLoGe (Xiao et al., ICLR 2024): joint local and generic federated learning under long-tailed data.

Written from the paper (arXiv 2401.08977: SSE-C objective Eq. 4, GA-FR Eq. 6, LA-FR Eq. 7, Fig. 2) and the
procedure and defaults of the official code (github.com/ZackZikaiXiao/FedLoGe at f4cac52: ``util/etf_methods.py``,
``fedloge.py``, ``realignment.py``); not a port of that code. The model is one backbone with three linear heads on
its features h (post-ReLU, not normalised):

* ``sse_c`` -- the **Static Sparse ETF Classifier** psi_SSE-C: a simplex ETF (d x K) with a fixed 60 %-zero
  mask, refined towards equal column norms gamma and equal angles, then frozen (with a frozen, seeded bias, as
  in the official code). Built **once on the server** (``Server.frozen_arrays``), sent once to each client,
  never trained, uploaded or aggregated. The backbone is trained with plain cross-entropy against its logits.
* ``global_head`` -- the auxiliary global head psi, trained with plain CE on ``h.detach()`` and averaged by the
  server with the backbone (sample-weighted, BatchNorm buffers included).
* ``personal_head`` -- client k's head phi_k, trained with plain CE on ``h.detach()``, never uploaded; the core
  keeps it per client between rounds (``personal_prefixes``, :mod:`fedlt.core.client_state`).

GLA-FR (closed form, no training) is applied at every evaluation:

* GA-FR, generic: psi'_c = s * psi_c / ||psi_c|| (s = 1.7, bias kept).
* LA-FR, personal ("norm transfer"): phi'_{k,c} = psi_c * ||phi_{k,c}|| with psi's bias; the personalized
  logits are phi_k(h) + phi'_k(h).

Every evaluation logs the generic SSE-C head, raw psi and realigned psi' and the personalized phi_k + phi'_k
(GLA-FR), phi_k + psi and the SSE-C head; absent-class masking is the core's, identical for every strategy.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.config import ConfigError, param
from fedlt.api.client import ClientAlgorithm, ClientContext, Predictor
from fedlt.api.server import ServerAlgorithm
from fedlt.seeding import derive_seed
from fedlt.train.local import run_local_epochs, sgd
from fedlt.train.losses import masked_loss
from strategies._common import require_linear_head

log = logging.getLogger("fedlt")

# Seed-stream purposes private to FedLoGe (fedlt.seeding uses 1-5).
SSE_C_STREAM, PERSONAL_INIT_STREAM = 101, 102

BIAS_MODES = ("frozen_random", "none")
REALIGN_BIAS_MODES = ("keep", "zero")
GENERIC_PREDICTORS = ("psi_realigned", "sse_c", "psi")
ANGLE_CLAMP = 0.99999  # the official clamp before arccos
EPS = 1e-12


# ============================================================================================ SSE-C
def simplex_etf(d: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Dense simplex ETF, d x K: sqrt(K/(K-1)) * P (I - 11^T/K), P the Q factor of a seeded Uniform[0,1) matrix.
    Unit columns with pairwise cosine -1/(K-1). Needs d >= K."""
    if d < k:
        raise ValueError(f"a simplex ETF needs feature dimension d >= number of classes K, got d={d}, K={k}")
    a = torch.rand(d, k, generator=generator, dtype=torch.float64)
    p, _ = torch.linalg.qr(a)  # reduced QR: d x K, orthonormal columns
    return math.sqrt(k / (k - 1)) * p @ (torch.eye(k, dtype=torch.float64) - 1.0 / k)


def sparsity_mask(d: int, k: int, beta: float, generator: torch.Generator) -> torch.Tensor:
    """Static global pruning: exactly int(beta*d*K) entries of the flattened d x K matrix, drawn uniformly
    without replacement, are False (pruned); the rest True."""
    keep = torch.ones(d * k, dtype=torch.bool)
    keep[torch.randperm(d * k, generator=generator)[: int(beta * d * k)]] = False
    return keep.view(d, k)


def sse_c_loss(w: torch.Tensor, gamma: float) -> torch.Tensor:
    """The refinement objective on a d x K matrix (columns = classes), as in the official ``gen_sparse_ETF``
    (``util/etf_methods.py``; the max over j is the paper's Eq. 4):
    sum_k (n_k - gamma)^2 - (1/K) sum_k arccos(clamp(max_{j != k} cos(w_k, w_j), +-0.99999)).
    Used by the tests to check the hand-written gradient of :func:`refine_sse_c`."""
    n = w.norm(dim=0)
    u = w / n
    k = w.shape[1]
    cos = (u.T @ u).masked_fill(torch.eye(k, dtype=torch.bool), -1.0)
    nearest = cos.max(dim=1).values.clamp(-ANGLE_CLAMP, ANGLE_CLAMP)
    return ((n - gamma) ** 2).sum() - torch.arccos(nearest).mean()


def refine_sse_c(w: torch.Tensor, keep: torch.Tensor, gamma: float, steps: int, lr: float) -> torch.Tensor:
    """Adam (default betas/eps) on the non-zero entries of ``w`` (d x K) for ``steps`` full-batch steps of
    :func:`sse_c_loss`; the gradient is multiplied by ``keep`` so pruned entries stay exactly 0.

    Why hand-written: autograd plus ``torch.optim.Adam`` cost ~1 ms per step here, i.e. minutes for K=100 on
    a busy CPU. The gradient is closed form (tested against autograd): with unit rows u_k (classes as rows,
    contiguous) and j(k) the nearest other class, d/dcos_{k,j(k)} = 1/(K sqrt(1 - c_k^2)) where unclamped, so
    dL/du needs only K row gathers instead of a K x K x d product; the rest is the norm/normalise chain rule.
    Float32 (the official dtype) on one thread, so the result does not depend on the machine's thread count.
    """
    b1, b2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults, same update formula
    x = w.T.contiguous().to(torch.float32)  # K x d: one class per row
    mask = keep.T.contiguous().to(torch.float32)
    k = x.shape[0]
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    diag = torch.arange(k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in range(1, steps + 1):
            n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            u = x / n
            cos = u @ u.T
            cos[diag, diag] = -1.0
            c, nearest = cos.max(dim=1)
            inside = (c.abs() <= ANGLE_CLAMP).to(x.dtype)
            g = (inside / (k * torch.sqrt((1 - c * c).clamp_min(EPS)))).unsqueeze(1)  # d(-mean arccos)/dc_k
            grad_u = u[nearest] * g  # row k of d/dU of sum_k g_k <u_k, u_j(k)> ...
            grad_u.index_add_(0, nearest, u * g)  # ... and row j(k)
            grad = (grad_u - u * (u * grad_u).sum(1, keepdim=True)).div_(n).add_(u * (2 * (n - gamma)))
            grad.mul_(mask)
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
            x.addcdiv_(m, denom, value=-lr / (1 - b1**t))
    finally:
        torch.set_num_threads(threads)
    return x.T.contiguous()


def build_sse_c(d: int, k: int, seed: int, beta: float = 0.6, gamma: float = 0.1, steps: int = 10_000,
                lr: float = 1e-4, bias: str = "frozen_random") -> dict[str, torch.Tensor]:
    """The SSE-C as ``nn.Linear(d, K)`` state: ``weight`` (K x d, float32) and, for ``bias="frozen_random"``,
    ``bias`` drawn like PyTorch's default Linear init, U(-1/sqrt(d), 1/sqrt(d)). One seeded stream for the ETF,
    the mask and the bias."""
    gen = torch.Generator().manual_seed(derive_seed(seed, SSE_C_STREAM))
    etf = simplex_etf(d, k, gen)
    keep = sparsity_mask(d, k, beta, gen)
    w = refine_sse_c(etf * keep, keep, gamma, steps, lr)
    out = {"weight": w.T.contiguous()}
    if bias == "frozen_random":
        bound = 1.0 / math.sqrt(d)
        out["bias"] = (torch.rand(k, generator=gen, dtype=torch.float64) * 2 * bound - bound).to(torch.float32)
    return out


def etf_geometry(weight: torch.Tensor) -> dict[str, float]:
    """Column-norm and pairwise-angle statistics of a classifier weight (K x d, one class per row), in the
    units used by the tests' reference values (norms; mean / min / max angle in degrees)."""
    w = weight.detach().double()
    n = w.norm(dim=1)
    u = w / n[:, None]
    i, j = torch.triu_indices(len(w), len(w), 1)
    ang = torch.rad2deg(torch.arccos((u[i] * u[j]).sum(1).clamp(-1, 1)))
    return {"norm_mean": float(n.mean()), "norm_std": float(n.std()), "angle_mean": float(ang.mean()),
            "angle_min": float(ang.min()), "angle_max": float(ang.max()), "zeros": int((w == 0).sum())}


# ============================================================================================ GLA-FR
def global_realignment(weight: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.7,
                       bias_mode: str = "keep") -> tuple[torch.Tensor, torch.Tensor | None]:
    """GA-FR (Eq. 6): psi'_c = s * psi_c / ||psi_c||; the bias is kept (official) or zeroed."""
    w = scale * weight / weight.norm(dim=1, keepdim=True).clamp_min(EPS)
    if bias is None:
        return w, None
    return w, (bias.clone() if bias_mode == "keep" else torch.zeros_like(bias))


def norm_transfer(psi_weight: torch.Tensor, psi_bias: torch.Tensor | None, phi_weight: torch.Tensor,
                  normalised_psi: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LA-FR (Eq. 7): phi'_{k,c} = psi_c * ||phi_{k,c}|| -- the direction of the global head, the per-class
    norm of the personal head; the bias is psi's. ``normalised_psi`` uses psi_c/||psi_c|| instead (ablation)."""
    direction = psi_weight / psi_weight.norm(dim=1, keepdim=True).clamp_min(EPS) if normalised_psi else psi_weight
    return direction * phi_weight.norm(dim=1, keepdim=True), psi_bias


# ============================================================================================ model
class FedLoGeNet(nn.Module):
    """backbone + frozen SSE-C + auxiliary global head psi + personal head phi_k. ``forward`` is the
    "universal" model SSE-C(backbone(x)), the one the backbone is trained against."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, sse_c_bias: bool = True,
                 global_head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.sse_c = nn.Linear(feature_dim, num_classes, bias=sse_c_bias)
        nn.init.zeros_(self.sse_c.weight)  # placeholder: the server's SSE-C is loaded over it (frozen arrays)
        if self.sse_c.bias is not None:
            nn.init.zeros_(self.sse_c.bias)
        self.sse_c.requires_grad_(False)
        self.global_head = global_head if global_head is not None else nn.Linear(feature_dim, num_classes)
        self.personal_head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sse_c(self.backbone(x))


class FeatureCache:
    """Backbone features of each evaluation batch, computed once and shared by all head-only predictors.

    ``predict_logits`` runs one predictor over all batches, then the next; on CPU every predictor sees the same
    slice views of the test tensor, so a batch is recognised by its storage address, shape, strides and version
    counter. The cached input is kept alive, so its address cannot be reused by another tensor meanwhile.
    Other devices (inputs copied per call) are not cached."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.items: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self.backbone(x)
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version)
        hit = self.items.get(key)
        if hit is None:
            hit = self.items[key] = (x, self.backbone(x))
        return hit[1]


def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda h: F.linear(h, weight, bias)


# ============================================================================================ client
class FedLoGeClient(ClientAlgorithm):
    personal_prefixes = ("personal_head.",)
    frozen_prefixes = ("sse_c.",)
    PERSONAL_READY = "fedloge.personal_head_initialised"  # marker in ctx.state: phi_k has its own init

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        return "after"  # personalized predictors use the client's own head phi_k

    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        s = cfg["strategy"]
        return FedLoGeNet(base.backbone, base.feature_dim, base.num_classes,
                          sse_c_bias=s.get("bias", "frozen_random") == "frozen_random", global_head=base.head)

    def ensure_personal_head(self, ctx: ClientContext) -> None:
        """phi_k starts from its own seeded default init (the official code creates one Linear per client),
        derived from (seed, client id), so a client evaluated before it was ever sampled sees the same phi_k
        its first training round starts from."""
        if self.PERSONAL_READY in ctx.state:
            return
        head = ctx.model.personal_head
        gen = torch.Generator().manual_seed(derive_seed(int(ctx.cfg["seed"]), PERSONAL_INIT_STREAM,
                                                        ctx.data.client_id))
        bound = 1.0 / math.sqrt(head.in_features)  # PyTorch's default Linear init: U(-1/sqrt(d), 1/sqrt(d))
        with torch.no_grad():
            for p in (head.weight, head.bias):
                p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 * bound - bound).to(p))

    def train(self, ctx: ClientContext) -> dict[str, float]:
        """The official local update: per batch, h = backbone(x); CE(SSE-C(h)) steps the backbone only;
        CE(psi(h.detach())) and CE(phi_k(h.detach())) step the two heads with their own optimizers, on the same
        pre-step features. Plain cross-entropy everywhere, as in the official code (``validate_config`` refuses
        another ``loss``)."""
        model = ctx.model
        if not bool(model.sse_c.weight.any()):
            raise RuntimeError("FedLoGe client has no SSE-C: the server's frozen arrays were never received")
        self.ensure_personal_head(ctx)
        model.train()
        opt_cfg = ctx.cfg["optimizer"]
        head_cfg = {**opt_cfg, "weight_decay": 0.0}  # heads: same lr and momentum, no weight decay (official)
        opt_backbone = sgd(model.backbone.parameters(), opt_cfg)
        opt_global = sgd(model.global_head.parameters(), head_cfg)
        opt_personal = sgd(model.personal_head.parameters(), head_cfg)
        head_losses = {"train/global_head_loss": 0.0, "train/personal_head_loss": 0.0}
        heads = ((model.global_head, opt_global, "train/global_head_loss"),
                 (model.personal_head, opt_personal, "train/personal_head_loss"))

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            h = model.backbone(x)
            loss = F.cross_entropy(model.sse_c(h), y)
            opt_backbone.zero_grad(set_to_none=True)
            loss.backward()
            opt_backbone.step()
            h = h.detach()
            for head, opt, key in heads:
                opt.zero_grad(set_to_none=True)
                head_loss = F.cross_entropy(head(h), y)
                head_loss.backward()
                opt.step()
                head_losses[key] += head_loss.item()
            return loss.detach().item()

        out = run_local_epochs(ctx.data, int(ctx.cfg["local_epochs"]), int(ctx.cfg["batch_size"]), ctx.generator,
                               step, ctx.device)
        ctx.state[self.PERSONAL_READY] = torch.ones(1)
        steps = max(out["train/steps"], 1.0)
        return {**out, **{k: v / steps for k, v in head_losses.items()}}

    # client batching (backend.client_batching): the same update as ``train``, for all clients at once
    batched_ready = True

    def batched_begin(self, ctx: ClientContext) -> None:
        if not bool(ctx.model.sse_c.weight.any()):
            raise RuntimeError("FedLoGe client has no SSE-C: the server's frozen arrays were never received")
        self.ensure_personal_head(ctx)

    def batched_terms(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        return {}  # plain cross-entropy everywhere, as in ``train``

    def batched_groups(self, model: nn.Module, cfg: dict) -> list[tuple[tuple[str, ...], dict]]:
        """``train``'s three SGD optimizers: the backbone with the run's optimizer, psi and phi_k with its lr and
        momentum and no weight decay (the SSE-C is frozen: no group)."""
        head_cfg = {**cfg["optimizer"], "weight_decay": 0.0}
        return [(("backbone.",), cfg["optimizer"]), (("global_head.",), head_cfg), (("personal_head.",), head_cfg)]

    def batched_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                     terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One batch of ``train``: the sum of CE(SSE-C(h)) (reaches the backbone only: the SSE-C is frozen),
        CE(psi(h.detach())) and CE(phi_k(h.detach())) (reach only their head), on the same pre-step features h,
        so each group's gradient is the one its own optimizer steps with in ``train``."""
        h = model.backbone(x)
        loss = masked_loss(terms, model.sse_c(h), y, weight)
        h = h.detach()
        global_loss = masked_loss(terms, model.global_head(h), y, weight)
        personal_loss = masked_loss(terms, model.personal_head(h), y, weight)
        return loss + global_loss + personal_loss, {"train/loss": loss, "train/global_head_loss": global_loss,
                                                    "train/personal_head_loss": personal_loss}

    def batched_end(self, ctx: ClientContext) -> None:
        ctx.state[self.PERSONAL_READY] = torch.ones(1)

    def predictors(self, ctx: ClientContext) -> dict[str, Predictor]:
        """Personalized models: GLA-FR phi_k + phi'_k (primary, the final method), phi_k + psi (the official
        training loop's PM), and the universal SSE-C model: the heads of ``personal_heads`` on the backbone's
        features. One backbone pass serves all three."""
        feats = FeatureCache(ctx.model.eval().backbone)
        return {name: (lambda x, head=head: head(feats(x))) for name, head in self.personal_heads(ctx).items()}

    def shared_features(self, model: nn.Module) -> nn.Module:
        """The backbone: every client's predictors are heads on its features (eval.personalized_path)."""
        return model.backbone

    def personal_heads(self, ctx: ClientContext) -> dict[str, Predictor]:
        """The three personalized predictors as heads on the backbone's features h (phi_k is this client's)."""
        self.ensure_personal_head(ctx)
        model = ctx.model.eval()
        psi, phi = model.global_head, model.personal_head
        phi_prime = linear(*norm_transfer(psi.weight.detach(), psi.bias.detach(), phi.weight.detach(),
                                          bool(ctx.strategy.get("transfer_normalised_psi", False))))
        return {"gla_fr": lambda h: phi(h) + phi_prime(h), "phi_plus_psi": lambda h: phi(h) + psi(h),
                "sse_c": model.sse_c}


# ============================================================================================ server
@dataclass(frozen=True)
class Params:
    """Defaults are the official code's (ZackZikaiXiao/FedLoGe)."""

    beta: float = param(0.6, "SSE-C sparsity: exactly int(beta*d*K) entries of the d x K ETF are fixed zeros",
                        lo=0.0, hi=1.0, hi_open=True)
    gamma: float = param(0.1, "target column norm of the SSE-C refinement; acts like an inverse temperature "
                              "(0.1 official; tuned for 500 rounds)", lo=0.0, lo_open=True)
    refine_steps: int = param(10_000, "full-batch Adam steps refining the non-zero entries (0 = pruned ETF as is)",
                              lo=0)
    refine_lr: float = param(1e-4, "Adam learning rate of the refinement", lo=0.0, lo_open=True)
    bias: str = param("frozen_random", "frozen_random: frozen seeded bias as in the official code; none: no bias",
                      choices=BIAS_MODES)
    realign_scale: float = param(1.7, "GA-FR: psi'_c = realign_scale * psi_c / ||psi_c|| (official 1.7)", lo=0.0,
                                 lo_open=True)
    realign_bias: str = param("keep", "GA-FR bias of psi': keep (official) or zero", choices=REALIGN_BIAS_MODES)
    transfer_normalised_psi: bool = param(False, "LA-FR with psi_c/||psi_c|| instead of raw psi (ablation)")
    generic_primary: str = param("psi_realigned", "what generic/accuracy reports: psi_realigned (GA-FR psi'), "
                                                  "sse_c or psi", choices=GENERIC_PREDICTORS)


class Server(ServerAlgorithm):
    """Flower's FedAvg aggregation already averages exactly what clients upload: the backbone (weights and
    BatchNorm buffers) and psi, weighted by sample counts; the SSE-C (frozen) and phi_k (personal) never
    travel back."""

    client_cls = FedLoGeClient
    params = Params
    secagg_ready = True  # the aggregate is the plain sample-weighted mean (privacy.secagg)

    def frozen_arrays(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Build the SSE-C once, seeded by the run seed (the refinement runs before round 1)."""
        s = self.cfg["strategy"]
        t0 = time.monotonic()
        sse_c = build_sse_c(model.feature_dim, model.num_classes, int(self.cfg["seed"]), beta=float(s["beta"]),
                            gamma=float(s["gamma"]), steps=int(s["refine_steps"]), lr=float(s["refine_lr"]),
                            bias=str(s["bias"]))
        self.sse_c_geometry = {**etf_geometry(sse_c["weight"]), "build_s": time.monotonic() - t0}
        log.info("FedLoGe SSE-C %dx%d built: %s", model.num_classes, model.feature_dim, self.sse_c_geometry)
        model.load_state_dict({f"sse_c.{k}": v for k, v in sse_c.items()}, strict=False)
        return {f"sse_c.{k}": v.clone() for k, v in sse_c.items()}

    def generic_predictors(self, model: nn.Module) -> dict[str, Predictor]:
        """The SSE-C ("universal") model, raw psi and GA-FR psi'; ``strategy.generic_primary`` comes first and
        is what ``generic/accuracy`` reports. One backbone pass serves all three."""
        s = self.cfg["strategy"]
        model.eval()
        feats = FeatureCache(model.backbone)
        psi = model.global_head
        psi_prime = linear(*global_realignment(psi.weight.detach(), psi.bias.detach(), float(s["realign_scale"]),
                                               str(s["realign_bias"])))
        predictors = {"sse_c": lambda x: model.sse_c(feats(x)), "psi": lambda x: psi(feats(x)),
                      "psi_realigned": lambda x: psi_prime(feats(x))}
        primary = str(s["generic_primary"])
        return {primary: predictors.pop(primary), **predictors}

    @torch.no_grad()
    def diagnostics(self, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
        """What exposes FedLoGe's short-budget collapse (every test image sent to one class): on up to 1,000 test
        images (every k-th), the mean feature norm, the share of feature energy along the mean feature direction (near 1: all
        features point one way), the row norms of psi, and the share of images psi' puts in its most-predicted
        class."""
        model.eval()
        h = model.backbone(x[:: max(1, len(x) // 1000)])  # strided: test splits are often sorted by class
        mean_dir = h.mean(0)
        mean_dir = mean_dir / mean_dir.norm().clamp_min(EPS)
        energy = float((h @ mean_dir).square().sum() / h.square().sum().clamp_min(EPS))
        s = self.cfg["strategy"]
        psi = model.global_head
        rows = psi.weight.norm(dim=1)
        w, b = global_realignment(psi.weight, psi.bias, float(s["realign_scale"]), str(s["realign_bias"]))
        top = torch.bincount(F.linear(h, w, b).argmax(1), minlength=model.num_classes).max()
        return {"fedloge/feature_norm_mean": float(h.norm(dim=1).mean()), "fedloge/feature_mean_direction_energy":
                energy, "fedloge/psi_row_norm_min": float(rows.min()), "fedloge/psi_row_norm_max": float(rows.max()),
                "fedloge/psi_realigned_top_class_share": float(top) / len(h)}

    @staticmethod
    def validate_config(cfg: dict) -> None:
        loss = (cfg.get("loss") or {}).get("name", "ce")
        if loss != "ce":
            raise ConfigError(
                f"invalid value loss.name={loss!r} with strategy=fedloge: FedLoGe trains the backbone, psi and "
                f"phi_k with plain cross-entropy (as the official code does); use loss=ce.")
        require_linear_head(cfg, "FedLoGe builds its own linear heads (SSE-C, psi, phi_k) on the backbone's features")

    @staticmethod
    def validate_data(cfg: dict, num_classes: int) -> None:
        """Once the dataset is known (before Ray starts): the simplex ETF needs d >= K."""
        from fedlt.models import build_backbone

        with torch.device("meta"):  # the feature width without allocating the backbone
            _, d = build_backbone(cfg["model"], 3)
        if d < num_classes:
            raise ConfigError(
                f"invalid model for strategy=fedloge: model={cfg['model']['name']} has {d}-d features but "
                f"dataset={cfg['dataset']['name']} has {num_classes} classes; the SSE-C is a d x K simplex ETF "
                f"and needs d >= K. Choose a model with at least {num_classes} features (e.g. "
                f"model.feature_dim={num_classes} for the cnn, or a wider last ResNet stage).")
