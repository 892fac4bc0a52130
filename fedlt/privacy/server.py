"""The server's half of client-level DP: sampling that matches the accountant, the noised aggregate, adaptive
clipping, the accountant's state, the budget, and the ``privacy/*`` metrics. The round loop
(:func:`fedlt.core.rounds.run_rounds`) builds one :class:`RunPrivacy` when ``privacy`` is not ``none`` and calls
it at fixed points; strategies never see it.

**dp_central** (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):

* sampling: ``poisson`` draws each client independently with probability q = participation from a stream
  seeded by (seed, round); ``fixed`` keeps the uniform sample of m = max(int(qN), 1) clients without replacement.
* the server re-clips every received update to C in float64 (the client already clipped it; re-clipping makes
  the sensitivity of the sum exactly C whatever the client or float32 rounding did), sums the clipped updates
  with equal weight (sample counts would be unprotected weights), adds N(0, (z_delta*C)^2) to every entry of the
  sum from a stream seeded by (seed, round), and divides by the EXPECTED number of clients, qN (poisson) or m
  (fixed) -- the fixed-denominator estimator of the paper, whose sensitivity does not depend on who took part.
* the strategy then sees exactly one reply, sent + noised mean update, weighted 1: ``aggregate`` and
  ``after_aggregate`` are post-processing of the released aggregate (FedAvg returns it as is, FedAdam/FedAvgM
  take their server step on it). The mechanism runs every round, even when no client was sampled or every reply
  failed (a skipped release would depend on who was sampled), so ``backend.min_clients_per_round`` must be 1.
* client batching: a cohort reply carries sent + the SUM of its m clients' clipped updates (each clipped on the
  client side, as alone) and the sum of their bits; it is re-clipped at mC and counts as m clients.
* adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"; the same rule
  as TensorFlow Privacy's ``QuantileAdaptiveClipSumQuery``): each client reports b = 1[norm <= C]; the server
  releases b_bar = (sum(b - 1/2) + N(0, sigma_b^2)) / expected + 1/2 (clamped to [0, 1]) and sets
  C <- C * exp(-eta_C * (b_bar - gamma)). The update noise multiplier z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)
  makes both releases together one Gaussian mechanism of multiplier z, the z the accountant composes.
* budget: with ``target_epsilon``, ``on_budget=calibrate`` picks z before round 1 so that ``num_rounds`` rounds
  spend at most the target; either way, a round is run only if the epsilon after it is within the budget, and a
  run whose next round would exceed it ends after the current round (evaluated and checkpointed).

**dp_local** (Flower's ``LocalDpMod``): the clients clip and noise (:mod:`fedlt.privacy.clipping`); the server
aggregates as the strategy says and accounts, per client, the composition of its uploads; the reported epsilon
is that of the client with the most uploads so far.

**dp_sgd** (sample-level DP-SGD inside the clients, :mod:`fedlt.privacy.dp_sgd`): the clients' updates are already
private; the server aggregates as the strategy says and keeps, per client, the rounds it was asked to train
(counted when asked, like dp_local's uploads). Client k's epsilon composes local_epochs * ceil(n_k / batch_size)
Poisson-subsampled Gaussian steps per such round (rate q_k, multiplier sigma_k; both pure functions of the
config and n_k, so the server recomputes them); ``privacy/epsilon`` is the largest client's.

Both: running variances that noise pushed below zero are clamped to 0 after aggregation (post-processing). With
``privacy.batchnorm_stats=unprotected`` the floating-point buffers are outside the mechanism: the clients send
them as trained and ``dp_central`` releases their plain mean (results.json says they are not covered by epsilon).
"""

from __future__ import annotations

import math

import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedlt.config import clients_per_round
from fedlt.privacy import accounting, dp_sgd
from fedlt.privacy.clipping import CLIP_KEY, UNCLIPPED, WITHHELD, client_sensitivity, flat_norm
from fedlt.privacy.params import CENTRAL, DPSGD, LOCAL
from fedlt.seeding import PRIVACY, SAMPLE, numpy_rng, torch_generator

NUM_EXAMPLES = "num-examples"  # the reply metric aggregation weights by (fedlt.api.server.NUM_EXAMPLES)
NUM_CLIENTS = "num-clients"  # reply metric of client batching: the clients one reply stands for
UPDATE_NOISE, COUNT_NOISE = 0, 1  # stream keys of the server's two noise draws in a round


class PrivacyBudgetError(RuntimeError):
    """A run that cannot be run within its privacy budget, or a reply that breaks the protocol."""


class RunPrivacy:
    """One run's privacy state and steps (see the module docstring). ``state``: a checkpoint's
    :meth:`state_dict` to continue from (the calibrated z is taken from it, not recomputed)."""

    def __init__(self, cfg: dict, state: dict | None = None, buffers=frozenset(), train_sizes=None):
        self.cfg = cfg
        self.unprotected = (frozenset(buffers) if cfg["privacy"].get("batchnorm_stats", "clip") == "unprotected"
                            else frozenset())  # float buffers averaged in the clear (the user's explicit choice)
        self.p = p = cfg["privacy"]
        self.mode = p["name"]
        self.seed = int(cfg["seed"])
        self.num_clients = n = int(cfg["num_clients"])
        self.num_rounds = int(cfg["num_rounds"])
        self.sample_size = clients_per_round(n, cfg["participation"])
        self.delta = float(p["delta"])
        self.kind = str(p.get("accountant", "rdp"))
        self.target = p.get("target_epsilon")
        if self.mode == CENTRAL:
            self.sampling = str(p["sampling"])
            self.q = float(cfg["participation"]) if self.sampling == accounting.POISSON else self.sample_size / n
            self.expected = self.q * n if self.sampling == accounting.POISSON else float(self.sample_size)
            self.adaptive = bool(p["adaptive_clipping"])
            self.count_stddev = (float(p["clipped_count_stddev"]) if p.get("clipped_count_stddev") is not None
                                 else self.expected / 20)
        elif self.mode == DPSGD:  # sample-level: per-client accounting of DP-SGD steps (fedlt.privacy.dp_sgd)
            self.sampling, self.q, self.expected, self.adaptive = "strategy", None, float(self.sample_size), False
            if train_sizes is None or len(train_sizes) != n:
                raise ValueError("privacy=dp_sgd needs every client's training-set size for its accountant")
            self.train_sizes = [int(k) for k in train_sizes]
        else:
            self.sampling, self.q, self.expected, self.adaptive = "strategy", None, float(self.sample_size), False
            self.local_std = accounting.local_noise_std(client_sensitivity(p), float(p["epsilon"]), self.delta)
            self.local_multiplier = self.local_std / client_sensitivity(p)
        # state (checkpointed)
        self.rounds = 0  # rounds accounted
        self.clip = float(p["clip_norm"])  # C of the next round
        self.round_clip = self.clip  # C used in the round being run
        self.z = float(p.get("noise_multiplier", 0.0))
        self.calibrated = False
        self.uploads: dict[int, int] = {}  # dp_local: client id -> uploads so far
        self.unclipped_fraction: float | None = None
        self.budget_stop = False
        if state:
            self.load_state_dict(state)
        elif self.mode == CENTRAL and self.target is not None and p["on_budget"] == "calibrate":
            self.z = accounting.calibrate_noise(float(self.target), self.num_rounds, self.delta, self.sampling,
                                                self.num_clients, self.sample_size, self.q or 0.0, self.kind)
            self.calibrated = True
        self.update_multiplier = (accounting.adaptive_update_multiplier(self.z, self.count_stddev) if self.adaptive
                                  else self.z)

    # ------------------------------------------------------------------------------------ sampling
    def clients(self, rnd: int, strategy_sample) -> list[int]:
        """The clients of round ``rnd`` (a pure function of (seed, round)): Poisson (dp_central,
        sampling=poisson) or the strategy's uniform sample of m clients without replacement."""
        if self.mode == CENTRAL and self.sampling == accounting.POISSON:
            rng = numpy_rng(self.seed, SAMPLE, rnd)
            return [int(c) for c in (rng.random(self.num_clients) < self.q).nonzero()[0]]
        return list(strategy_sample(rnd))

    def sample(self, rnd: int, strategy_sample) -> list[int]:
        """:meth:`clients`, counted: the round's train messages go to these clients."""
        clients = self.clients(rnd, strategy_sample)
        if self.mode in (LOCAL, DPSGD):
            for c in clients:
                self.uploads[c] = self.uploads.get(c, 0) + 1  # counted when asked: a lost reply is still counted
        return clients

    def train_config(self) -> dict:
        self.round_clip = self.clip
        return {CLIP_KEY: self.clip}

    # ------------------------------------------------------------------------------------ replies
    @staticmethod
    def check_replies(replies: list[Message], strategy_name: str) -> None:
        """A client whose algorithm tried to upload arrays besides its model update (``ctx.uploads``) had them
        withheld; the run stops here, because the algorithm cannot work without them."""
        for r in replies:
            m = next(iter(r.content.metric_records.values()))
            if float(m.get(WITHHELD, 0)) > 0:
                raise PrivacyBudgetError(
                    f"privacy: the clients of strategy={strategy_name} upload arrays besides their model update "
                    f"(ctx.uploads), which client-level DP neither clips nor noises; they were withheld. Declare "
                    f"them in the client class's `extra_uploads` (the run is then refused before it starts) or run "
                    f"with privacy=none.")

    def noised_replies(self, rnd: int, sent: ArrayRecord, replies: list[Message]) -> list[Message]:
        """dp_central: the one reply the strategy aggregates -- sent + (sum of clipped updates + noise) / expected
        clients (module docstring); also the adaptive clipping step."""
        start = {k: torch.from_numpy(a.numpy()) for k, a in sent.items()}
        floats = [k for k, v in start.items() if v.is_floating_point() and k not in self.unprotected]
        total = {k: torch.zeros(start[k].shape, dtype=torch.float64) for k in floats}
        plain = {k: [] for k, v in start.items() if k in self.unprotected and v.is_floating_point()}
        below = 0.0
        for r in replies:
            got = r.content["arrays"]
            extra = sorted(set(got.keys()) - set(start))
            if extra:
                raise PrivacyBudgetError(f"privacy: a reply carries arrays that are not model arrays ({extra[:3]}); "
                                         f"they would be released without protection")
            metrics = next(iter(r.content.metric_records.values()))
            # a client-batching reply stands for m clients: sent + the SUM of their clipped updates and the sum of
            # their bits (fedlt.core.client_step.protected_cohort). A sum of m vectors of norm <= C has norm <= mC,
            # so re-clipping it at mC never changes a correct sum; it bounds what a faulty one can add, as for one.
            m = int(metrics.get(NUM_CLIENTS, 1))
            update = {k: torch.from_numpy(got[k].numpy()).double() - start[k].double() for k in floats if k in got}
            norm = flat_norm(update.values())
            scale = min(1.0, m * self.round_clip / norm) if norm > 0 else 1.0
            for k, u in update.items():
                total[k] += u * scale
            for k in plain:  # batchnorm_stats=unprotected: a cohort reply carries its clients' mean, counted m times
                plain[k].extend([torch.from_numpy(got[k].numpy()).double()] * m)
            below += float(metrics.get(UNCLIPPED, float(m))) - 0.5 * m
        return self.release(rnd, sent, total, below, plain)

    def release(self, rnd: int, sent: ArrayRecord, total: dict[str, torch.Tensor], below: float,
                plain: dict | None = None) -> list[Message]:
        """dp_central's release from the float64 SUM of clipped updates ``total`` (every protected float array) and
        ``below`` = sum(b - 1/2) of the unclipped bits: noise, / expected clients, adaptive clipping. Also called
        with the secure sum of ``privacy.secagg`` (:mod:`fedlt.privacy.secagg`), where the server sees no update."""
        start = {k: torch.from_numpy(a.numpy()) for k, a in sent.items()}
        plain = plain or {}
        g = torch_generator(self.seed, PRIVACY, rnd, UPDATE_NOISE)
        std = self.update_multiplier * self.round_clip
        out = {}
        for k, v in start.items():
            if k in total:
                if std > 0:
                    total[k] += torch.normal(0.0, std, v.shape, generator=g, dtype=torch.float64)
                out[k] = Array((v.double() + total[k] / self.expected).to(v.dtype).numpy())
            elif plain.get(k):  # batchnorm_stats=unprotected: the plain mean of the replies (no protection)
                out[k] = Array((sum(plain[k]) / len(plain[k])).to(v.dtype).numpy())
            else:
                out[k] = Array(v.numpy().copy())
        if self.adaptive:
            noise = (torch.normal(0.0, self.count_stddev, (1,), generator=torch_generator(
                self.seed, PRIVACY, rnd, COUNT_NOISE), dtype=torch.float64).item() if self.z > 0 else 0.0)
            frac = min(1.0, max(0.0, (below + noise) / self.expected + 0.5))
            self.unclipped_fraction = frac
            self.clip = self.round_clip * math.exp(-float(self.p["clip_learning_rate"])
                                                   * (frac - float(self.p["target_unclipped_quantile"])))
        content = RecordDict({"arrays": ArrayRecord(out),
                              "metrics": MetricRecord({NUM_EXAMPLES: 1, "client-id": -1})})
        return [Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)]

    @staticmethod
    def postprocess(arrays: ArrayRecord) -> ArrayRecord:
        """Running variances that the noise pushed below zero are clamped to 0 (post-processing: no privacy
        cost; a negative variance would make BatchNorm's evaluation NaN)."""
        bad = [k for k, a in arrays.items() if k.endswith("running_var") and (a.numpy() < 0).any()]
        if not bad:
            return arrays
        return ArrayRecord({k: Array(a.numpy().clip(min=0).astype(a.numpy().dtype)) if k in bad else a
                            for k, a in arrays.items()})

    # ------------------------------------------------------------------------------------ accounting
    def account(self, rnd: int) -> None:
        """Round ``rnd`` ran (its sample was drawn and its aggregate released)."""
        self.rounds = rnd

    # ------------------------------------------------------------------------------------ dp_sgd (per client)
    def client_schedule(self, cid: int) -> tuple[float, float, int]:
        """dp_sgd: client ``cid``'s (sampling rate q_k, noise multiplier sigma_k, DP-SGD steps per round)."""
        n = self.train_sizes[cid]
        return (dp_sgd.sampling_rate(n, int(self.cfg["batch_size"])), dp_sgd.noise_multiplier(self.cfg, n),
                dp_sgd.steps_per_round(n, self.cfg))

    def client_epsilon(self, cid: int) -> float:
        """dp_sgd: epsilon of client ``cid`` after every round it was asked to train so far (its steps compose)."""
        rounds = self.uploads.get(cid, 0)
        if rounds == 0:
            return 0.0
        q, sigma, steps = self.client_schedule(cid)
        return accounting.dp_sgd_epsilon(sigma, q, steps * rounds, self.delta)

    def client_epsilons(self) -> list[float]:
        return [self.client_epsilon(c) for c in range(self.num_clients)]

    def epsilon(self, rounds: int | None = None) -> float:
        rounds = self.rounds if rounds is None else rounds
        if self.mode == DPSGD:  # the guarantee that holds for every client's samples: the largest
            return max(self.client_epsilons(), default=0.0)
        if self.mode == CENTRAL:
            return accounting.central_epsilon(self.z, rounds, self.delta, self.sampling, self.num_clients,
                                              self.sample_size, self.q, self.kind)
        return accounting.local_epsilon(self.local_multiplier, max(self.uploads.values(), default=0), self.delta,
                                        self.kind)

    def affordable(self, rnd: int) -> bool:
        """Whether round ``rnd`` can run within the budget (always, without target_epsilon or under dp_local)."""
        if self.mode != CENTRAL or self.target is None:
            return True
        return self.epsilon(rnd) <= float(self.target)

    def metrics(self) -> dict:
        """The ``privacy/*`` values of the round just accounted (train and evaluation rows)."""
        out = {"privacy/epsilon": self.epsilon(), "privacy/delta": self.delta,
               "privacy/clip_norm": self.round_clip}
        if self.mode == DPSGD:
            eps = self.client_epsilons()
            out["privacy/client_epsilon_max"] = max(eps, default=0.0)
            out["privacy/client_epsilon_mean"] = sum(eps) / max(len(eps), 1)
            if self.target is None:
                out["privacy/noise_multiplier"] = self.z
            out["privacy/max_uploads"] = max(self.uploads.values(), default=0)
        elif self.mode == CENTRAL:
            out["privacy/noise_multiplier"] = self.z
            if self.adaptive:
                out["privacy/update_noise_multiplier"] = self.update_multiplier
                out["privacy/unclipped_fraction"] = self.unclipped_fraction
        else:
            out["privacy/noise_multiplier"] = self.local_multiplier
            out["privacy/noise_std"] = self.local_std
            out["privacy/max_uploads"] = max(self.uploads.values(), default=0)
        return out

    def summary(self) -> dict:
        """What results.json records about the run's privacy."""
        out = {"mode": self.mode, "epsilon": self.epsilon(), "delta": self.delta, "accountant": self.kind,
               "rounds_accounted": self.rounds, "clip_norm": self.round_clip,
               "batchnorm_stats": ("averaged WITHOUT protection, not covered by epsilon" if self.p.get(
                   "batchnorm_stats", "clip") == "unprotected" else "clipped and noised with the update"),
               "not_protected": "train-reply diagnostics (num-examples, train/loss, steps, times) and the clients' "
                                "evaluation metrics; see README Privacy"}
        if self.mode == DPSGD:
            schedules = [self.client_schedule(c) if self.uploads.get(c) else None for c in range(self.num_clients)]
            eps = self.client_epsilons()
            out.update({
                "unit": "sample (one training sample of one client; each client's epsilon is for its own data)",
                "neighbouring_relation": "add/remove one training sample of a client",
                "mechanism": "DP-SGD: Poisson batches (q_k = 1/ceil(n_k/batch_size)), per-sample clipping to "
                             "clip_norm, Gaussian noise noise_multiplier*clip_norm on the sum, / expected batch size",
                "noise_multiplier": None if self.target is not None else self.z,
                "noise_calibrated": self.target is not None, "target_epsilon": self.target,
                "client_epsilon_max": max(eps, default=0.0), "client_epsilon_mean": sum(eps) / max(len(eps), 1),
                "client_epsilon": eps,
                "client_rounds_trained": [self.uploads.get(c, 0) for c in range(self.num_clients)],
                "client_sampling_rate": [s[0] if s else None for s in schedules],
                "client_noise_multiplier": [s[1] if s else None for s in schedules],
                "client_steps_per_round": [s[2] if s else None for s in schedules],
                "epsilon_is_for": "the client with the largest epsilon (client_epsilon lists every client's)",
            })
            out["batchnorm_stats"] = "none (model.norm=group: dp_sgd refuses BatchNorm)"
        elif self.mode == CENTRAL:
            out.update({
                "sampling": self.sampling,
                "neighbouring_relation": ("add/remove one client" if self.sampling == accounting.POISSON
                                          else "replace one client"),
                "sampling_probability": self.q, "expected_clients_per_round": self.expected,
                "noise_multiplier": self.z, "noise_calibrated": self.calibrated,
                "target_epsilon": self.target, "on_budget": self.p["on_budget"],
                "stopped_on_budget": self.budget_stop, "adaptive_clipping": self.adaptive,
                "unit": "client (user-level DP: one client's whole update per round)",
            })
            if self.adaptive:
                out.update({"update_noise_multiplier": self.update_multiplier,
                            "clipped_count_stddev": self.count_stddev, "next_clip_norm": self.clip})
        else:
            out.update({"epsilon_per_upload": float(self.p["epsilon"]), "noise_std": self.local_std,
                        "sensitivity": client_sensitivity(self.p), "noise_multiplier": self.local_multiplier,
                        "max_uploads_per_client": max(self.uploads.values(), default=0),
                        "epsilon_is_for": "the client with the most uploads (composition of its uploads)"})
        return out

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"rounds": self.rounds, "clip": self.clip, "round_clip": self.round_clip, "z": self.z,
                "calibrated": self.calibrated, "uploads": {int(c): int(k) for c, k in self.uploads.items()},
                "unclipped_fraction": self.unclipped_fraction, "budget_stop": self.budget_stop,
                "summary": self.summary()}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])
        self.clip, self.round_clip = float(state["clip"]), float(state["round_clip"])
        self.z, self.calibrated = float(state["z"]), bool(state["calibrated"])
        self.uploads = {int(c): int(k) for c, k in state["uploads"].items()}
        self.unclipped_fraction = state.get("unclipped_fraction")
        self.budget_stop = bool(state.get("budget_stop", False))
