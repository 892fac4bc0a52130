"""CCVR (Luo et al., NeurIPS 2021, "No Fear of Heterogeneity: Classifier Calibration for Federated Learning with
Non-IID Data", arXiv 2106.05001): FedAvg, plus classifier calibration with virtual representations.

* Training is plain FedAvg (the client's default local SGD, sample-weighted averaging); calibration never feeds
  back into training.
* Statistics (every evaluation round, from EVERY client, through the core's eval-uploads pass:
  ``ClientAlgorithm.eval_uploads``): with the round's global model (body in eval mode, no augmentation), each
  client k computes the features z of its own training images and, per class c it holds, the count N_{c,k}, the
  mean mu_{c,k} and the unbiased covariance Sigma_{c,k} = 1/(N_{c,k}-1) sum (z - mu_{c,k})(z - mu_{c,k})^T (the
  paper's Eq. 3). Uploads (``ccvr.*``): ``ccvr.count`` (K), ``ccvr.mean`` (K x d, zero rows for absent classes)
  and ``ccvr.cov.<c>`` (d x d) for every class with N_{c,k} >= 2 (a single sample adds nothing to the formula
  below, whose factor N_{c,k}-1 is 0), in float32.
* Server (``after_eval_uploads``; it reads nothing but those replies and the global head): the paper's Eq. 4,
  N_c = sum_k N_{c,k}, mu_c = sum_k N_{c,k}/N_c mu_{c,k}, and
  Sigma_c = sum_k (N_{c,k}-1)/(N_c-1) Sigma_{c,k} + sum_k N_{c,k}/(N_c-1) mu_{c,k} mu_{c,k}^T
  - N_c/(N_c-1) mu_c mu_c^T, which equals the unbiased covariance of the pooled features exactly (tested); in
  float64. Then ``virtual_per_class`` virtual features per class with N_c >= 2 are drawn from N(mu_c, Sigma_c)
  (through the eigen-decomposition of Sigma_c, negative eigenvalues of rounding set to 0; seeded by (seed,
  round)), and the global linear head, starting from the FedAvg head, is re-trained on them with cross-entropy:
  SGD (lr ``calibration_lr``, default the run's ``optimizer.lr``; momentum ``calibration_momentum`` 0; no weight
  decay), ``calibration_epochs`` epoch(s) of shuffled batches of ``calibration_batch_size`` (default the run's
  ``batch_size``). The calibrated head goes to every client with that round's evaluate messages (``ctx.received``).
* Predictors, generic and personalized (stage "before": the received global model, calibrated on the server):
  ``ccvr`` (primary) = FedAvg body + calibrated head, and ``fedavg`` = the unchanged FedAvg model (the global
  arrays are never modified). Personalized evaluation scores the calibrated global model on every client's local
  test set, as FL-bench does (``test_client_models``: calibrate, score the clients, restore the FedAvg
  parameters). If no client sent statistics in a round (all failed), ``ccvr`` is the FedAvg head for that round.

Checked against FL-bench (KarhouTam/FL-bench at commit 06e658bca5af6ce732e25bb7c0f8be321e14a85e,
``src/server/ccvr.py`` ``compute_classes_mean_cov`` / ``generate_virtual_representation`` /
``calibrate_classifier`` and ``src/client/ccvr.py``; the authors released no code): same combination formula,
same classes (N_c > 1), the default ``sample_per_class`` 200, SGD on the classifier with the clients' lr, no
momentum, the run's batch size, one pass, starting from the FedAvg classifier, calibration at every test round
from all clients with the parameters restored afterwards. Also read: FedETF's CCVR baseline
(ZexiLee/ICCV-2023-FedETF at 092ace3471d0489c432fcde811ed7b7081042720, ``server_funct.py`` ``ccvr``: per-dimension
std instead of covariance, unweighted means, 10 features per class, 100 epochs at lr 0.01, batch 128) and
LongTailLib (Wudib/LongTailLib, ``system/flcore/servers/serverccvr.py``: count-weighted covariance without the
mean terms, 2000 per class, 10 epochs at lr 0.001, momentum 0.9): neither uses the paper's Eq. 4, so FL-bench is
the reference.

Deviations: clients send the unbiased local covariance (the paper's Eq. 3), whereas FL-bench's client computes
the biased one (``cov(correction=0)``) and then applies Eq. 4, which assumes unbiased ones -- with it Eq. 4 is
exact (tested against the pooled covariance); features come from the stored training images without
augmentation (FL-bench iterates its training loader); sampling by eigen-decomposition in torch rather than
``np.random.multivariate_normal`` (the same distribution, seeded); each covariance is sent only for classes the
client holds at least twice (FL-bench sends K zero-padded d x d matrices). The statistics pass is one extra
evaluate exchange per evaluation round (the core's eval-uploads pass), so the calibrated head can be scored on the
clients in the same round.

Uploads besides weights (privacy): per-class feature means, covariances and counts of the global model on each
client's training data (i.e. its label histogram and second-order feature statistics), at every evaluation
round, from every client; they are not protected, so client-level DP refuses the strategy (``extra_uploads``).
Costs: each client runs one extra forward pass over its training data per evaluation round and uploads one
d x d float32 covariance per class it holds twice or more (d = 128: 64 KB per class; d = 512: 1 MB per class,
100 MB for a client holding all 100 classes); the server step, on one thread of a loaded 2-core machine: K = 10,
d = 128, 40 clients: 0.14 s combining, 0.2 s sampling, 0.17 s calibration (2,000 features, batch 32); K = 100,
d = 512, 20 clients: 11 s combining, 23 s sampling (one 512 x 512 eigen-decomposition per class), 1.9 s calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message
from torch import nn

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.api.server import ServerAlgorithm
from fedlt.config import param
from fedlt.seeding import derive_seed
from strategies._common import require_linear_head

UP = "ccvr."  # eval-upload prefix
COUNT, MEAN, COV = UP + "count", UP + "mean", UP + "cov."  # K; K x d; d x d per class held >= 2 times
HEAD_W, HEAD_B = "ccvr.head.weight", "ccvr.head.bias"  # the calibrated head, sent with the evaluate messages
CCVR_STREAM = 1014  # seed purpose of the virtual features and the calibration's shuffling


# ------------------------------------------------------------------------------------------ statistics
def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Client side: per-class count, mean and unbiased covariance of ``features`` (n x d) -- the upload."""
    f = features.detach().double().cpu()
    labels = labels.cpu().long()
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, labels, f)
    means = sums / counts.clamp(min=1)[:, None]
    out = {COUNT: counts.float(), MEAN: means.float()}
    for c in torch.nonzero(counts >= 2).flatten().tolist():
        z = f[labels == c] - means[c]
        out[f"{COV}{c}"] = (z.T @ z / (int(counts[c]) - 1)).float()
    return out


def global_gaussians(stats: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                    dict[int, torch.Tensor]]:
    """Server side, the paper's Eq. 4 over the clients' uploads: (N_c, mu_c, {c: Sigma_c for N_c >= 2}), float64."""
    counts = torch.stack([s[COUNT].double() for s in stats])  # clients x K
    means = torch.stack([s[MEAN].double() for s in stats])  # clients x K x d
    total = counts.sum(0)
    mu = (counts[:, :, None] * means).sum(0) / total.clamp(min=1)[:, None]
    covs = {}
    for c in torch.nonzero(total >= 2).flatten().tolist():
        n = float(total[c])
        cov = -n / (n - 1) * torch.outer(mu[c], mu[c])
        for k, s in enumerate(stats):
            n_k = float(counts[k, c])
            if n_k == 0:
                continue
            cov += n_k / (n - 1) * torch.outer(means[k, c], means[k, c])
            if n_k >= 2:
                cov += (n_k - 1) / (n - 1) * s[f"{COV}{c}"].double()
        covs[c] = cov
    return total, mu, covs


def virtual_features(mu: torch.Tensor, covs: dict[int, torch.Tensor], per_class: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` draws from N(mu_c, Sigma_c) for every class with a covariance (float64), and their labels."""
    feats, labels = [], []
    for c in sorted(covs):
        cov = (covs[c] + covs[c].T) / 2
        evals, evecs = torch.linalg.eigh(cov)
        z = torch.randn(per_class, cov.shape[0], generator=generator, dtype=torch.float64)
        feats.append(mu[c] + (z * evals.clamp(min=0).sqrt()) @ evecs.T)
        labels.append(torch.full((per_class,), c, dtype=torch.long))
    if not feats:
        return torch.zeros(0, mu.shape[1], dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def calibrate_head(weight: torch.Tensor, bias: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, lr: float,
                   momentum: float, epochs: int, batch_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-train a linear head (starting from ``weight``, ``bias``) on the virtual features with cross-entropy and
    SGD: ``epochs`` passes over seeded shuffles in batches of ``batch_size``."""
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    x = feats.float()
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            loss = F.cross_entropy(head(x[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.weight.detach().clone(), head.bias.detach().clone()


def linear_predictor(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor):
    return lambda x: F.linear(model.features(x), weight.to(x.device), bias.to(x.device))


# ------------------------------------------------------------------------------------------ client
class CCVRClient(ClientAlgorithm):
    extra_uploads = ("per-class feature means, covariances and counts of the global model on the client's training "
                     "data (CCVR's statistics, ccvr.*, every evaluation round)")

    def eval_uploads(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        model, data = ctx.model.eval(), ctx.data
        batch = int(ctx.cfg["eval"]["batch_size"])
        with torch.no_grad():
            feats = [model.features(data.normalise(data.train_x[i:i + batch]).to(ctx.device)).cpu()
                     for i in range(0, data.num_train, batch)]
        feats = torch.cat(feats) if feats else torch.zeros(0, model.head.in_features)
        return class_statistics(feats, data.train_y, int(data.train_counts.numel()))

    def predictors(self, ctx: ClientContext):
        model = ctx.model.eval()
        if HEAD_W in ctx.received:
            ccvr = linear_predictor(model, ctx.received[HEAD_W], ctx.received[HEAD_B])
        else:  # no calibration this round (no client sent statistics)
            ccvr = model
        return {"ccvr": ccvr, "fedavg": model}


# ------------------------------------------------------------------------------------------ server
@dataclass(frozen=True)
class Params:
    virtual_per_class: int = param(200, "virtual features drawn per class (FL-bench sample_per_class 200)", lo=1)
    calibration_epochs: int = param(1, "passes of classifier calibration over the virtual features (FL-bench: 1)",
                                    lo=0)
    calibration_lr: float | None = param(None, "SGD lr of the calibration; null = the run's optimizer.lr (FL-bench)",
                                         lo=0.0, lo_open=True)
    calibration_momentum: float = param(0.0, "SGD momentum of the calibration (FL-bench: none)", lo=0.0, hi=1.0,
                                        hi_open=True)
    calibration_batch_size: int | None = param(None, "batch size of the calibration; null = the run's batch_size "
                                                     "(FL-bench)", lo=1)


class Server(ServerAlgorithm):
    client_cls = CCVRClient
    params = Params

    @staticmethod
    def validate_config(cfg: dict) -> None:
        require_linear_head(cfg, "CCVR re-trains a linear classifier (weight and bias) on virtual features")

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.calibrated: tuple[torch.Tensor, torch.Tensor] | None = None  # this evaluation round's head

    def after_eval_uploads(self, server_round: int, arrays: ArrayRecord,
                           replies: list[Message]) -> dict[str, torch.Tensor]:
        """Global Gaussians from the replies' statistics, virtual features, calibrated head (module docstring)."""
        self.calibrated = None
        stats = [{k: torch.from_numpy(np.array(a.numpy())) for k, a in r.content["arrays"].items()
                  if k.startswith(UP)} for r in replies]
        stats = [s for s in stats if COUNT in s]
        if not stats:
            return {}
        weight = torch.from_numpy(np.array(arrays["head.weight"].numpy()))
        bias = torch.from_numpy(np.array(arrays["head.bias"].numpy()))
        self.calibrated = self.calibrate(server_round, weight, bias, stats)
        return {HEAD_W: self.calibrated[0], HEAD_B: self.calibrated[1]}

    def calibrate(self, server_round: int, weight: torch.Tensor, bias: torch.Tensor,
                  stats: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        s, cfg = self.cfg["strategy"], self.cfg
        g = torch.Generator().manual_seed(derive_seed(int(cfg["seed"]), CCVR_STREAM, server_round))
        old = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of tiny ops: one thread is fastest (see CReFF)
        try:
            _, mu, covs = global_gaussians(stats)
            feats, labels = virtual_features(mu, covs, int(s["virtual_per_class"]), g)
            lr = float(s["calibration_lr"] if s.get("calibration_lr") is not None else cfg["optimizer"]["lr"])
            batch = int(s["calibration_batch_size"] if s.get("calibration_batch_size") is not None
                        else cfg["batch_size"])
            return calibrate_head(weight, bias, feats, labels, lr, float(s["calibration_momentum"]),
                                  int(s["calibration_epochs"]), batch, g)
        finally:
            torch.set_num_threads(old)

    def generic_predictors(self, model: nn.Module):
        model.eval()
        ccvr = model if self.calibrated is None else linear_predictor(model, *self.calibrated)
        return {"ccvr": ccvr, "fedavg": model}
