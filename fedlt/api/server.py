"""What an algorithm author sees, server side: :class:`ServerAlgorithm`.

fedlt's server API is its own small protocol, not a Flower ``Strategy``: a Fed-LT run needs seeded client
sampling that does not depend on node ids, evaluation of ALL clients every ``eval.every`` rounds, frozen arrays
sent once, rejection of failed or non-finite updates, checkpoints and resume -- so the round loop
(:func:`fedlt.core.rounds.run_rounds`) is fedlt's, and an algorithm only fills in the hooks below. Flower is
used as a library where it does the protocol's exact thing: replies are Flower ``Message`` objects, the default
aggregation is Flower's ``aggregate_arrayrecords`` (sample-weighted average), and server optimizers hold a
Flower ``FedAdam`` / ``FedAvgM`` object and call its update (``strategies/_server_opt.py``).

Hooks (override in ``strategies/<name>.py``, class ``Server``):

* ``client_cls`` -- the client side (a :class:`fedlt.api.client.ClientAlgorithm` subclass).
* ``params`` -- the strategy's hyper-parameters as a dataclass of :func:`fedlt.config.param` fields (default,
  type, range, doc in one place); ``configs/strategy/<name>.yaml`` holds the same defaults (tested).
* ``validate_config(cfg)`` / ``validate_data(cfg, num_classes)`` -- rules across options, checked before Ray.
* ``sample_clients(server_round)`` -- who trains this round (default: the seeded uniform sample).
* ``train_config(server_round)`` -- extra scalars sent with the global arrays.
* ``round_arrays(server_round)`` -- extra arrays sent with the global arrays (the client's ``ctx.received``).
* ``frozen_arrays(model)`` -- arrays built once on the server and sent once to each client.
* ``aggregate(server_round, sent, replies)`` -- the new shared arrays from accepted replies.
* ``after_aggregate(server_round, arrays, replies)`` -- a server-side step after aggregation (e.g. CReFF).
* ``after_eval_uploads(server_round, arrays, replies)`` -- at an evaluation round, the replies of EVERY client's
  ``ClientAlgorithm.eval_uploads`` (statistics of the round's global model ``arrays``), seen before anything is
  scored; returns arrays sent with that round's evaluate messages (``ctx.received``), e.g. CCVR's calibrated head.
  Runs only for algorithms whose client overrides ``eval_uploads``.
* ``generic_predictors(model)`` -- the global model(s) scored on the balanced test set; the first is primary
  (``generic_metrics`` adds the ``eval.posthoc`` predictors after them, for every strategy).
* ``diagnostics(model, x)`` -- extra scalars about the global model, logged with every evaluation.
* ``server_state()`` / ``load_server_state(state)`` -- strategy state that checkpoints must carry.
* ``secagg_ready`` -- set ``True`` in the strategy's OWN ``Server`` body (not inherited) when a round needs nothing
  from the clients but the sample-weighted mean of their model arrays (``aggregate`` / ``after_aggregate`` see one
  reply holding it; no individual replies, uploads or client choice): ``privacy.secagg`` refuses the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedlt.api.client import ClientAlgorithm, Predictor
from fedlt.data.federated import ClientData
from fedlt.config import clients_per_round
from fedlt.eval import posthoc
from fedlt.eval.generic import GenericEvaluation
from fedlt.eval.personalized import personalized_metrics
from fedlt.eval.predict import predict_logits
from fedlt.seeding import SAMPLE, numpy_rng
from fedlt.train import decoupled

NUM_EXAMPLES = "num-examples"  # the reply metric every aggregation weights by


@dataclass(frozen=True)
class NoParams:
    """The hyper-parameters of a strategy that has none (``strategy.*`` holds only its name)."""


class ServerAlgorithm:
    """FedAvg's server side; subclass it and override what differs (see the module docstring)."""

    client_cls: type[ClientAlgorithm] = ClientAlgorithm
    params: type = NoParams  # a dataclass of fedlt.config.param fields
    secagg_ready: bool = False  # read from the strategy's own Server class only (fedlt.validate; see above)

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.frozen: dict[str, torch.Tensor] = {}
        # the server-held balanced training set (``server_data.per_class``; a ClientData view, client_id -1), set by
        # the core before round 1; None without one. A strategy that needs it declares ``strategy.server_per_class``
        self.server_data: ClientData | None = None

    # ---------------------------------------------------------------------------------- validation
    @staticmethod
    def validate_config(cfg: dict) -> None:
        """Rules across options (each option's own type and range come from ``params``)."""

    @staticmethod
    def validate_data(cfg: dict, num_classes: int) -> None:
        """Rules that need the dataset (checked after the data are prepared, before Ray starts)."""

    # --------------------------------------------------------------------------------------- hooks
    def sample_clients(self, server_round: int) -> list[int]:
        """Uniform sample without replacement of :func:`fedlt.config.clients_per_round` client ids, from a
        stream derived from (seed, round): independent of node ids, actor count and history."""
        n = int(self.cfg["num_clients"])
        rng = numpy_rng(int(self.cfg["seed"]), SAMPLE, server_round)
        return sorted(int(c) for c in rng.choice(n, size=clients_per_round(n, self.cfg["participation"]),
                                                 replace=False))

    def train_config(self, server_round: int) -> dict:
        return {}

    def round_arrays(self, server_round: int) -> dict[str, torch.Tensor]:
        """Extra arrays sent with the global arrays in this round's train AND evaluate messages (the client reads
        them as ``ctx.received``): state the server updates every round that is not model weights. Called once
        per message: compute in ``after_aggregate`` and return the stored tensors."""
        return {}

    def frozen_arrays(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if self.client_cls.is_frozen(k)}

    def aggregate(self, server_round: int, sent: ArrayRecord, replies: list[Message]) -> ArrayRecord | None:
        """Sample-weighted average of the replies' arrays (Flower's ``aggregate_arrayrecords``); None = keep."""
        return aggregate_arrayrecords([r.content for r in replies], NUM_EXAMPLES) if replies else None

    def after_aggregate(self, server_round: int, arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        return arrays

    def after_eval_uploads(self, server_round: int, arrays: ArrayRecord,
                           replies: list[Message]) -> dict[str, torch.Tensor]:
        """Evaluation rounds, for clients that override ``eval_uploads``: ``replies`` are the accepted replies
        of the eval-uploads pass (every client that answered, sorted by client id; each holds ``arrays`` =
        its uploads and the metrics ``client-id`` / ``num-examples``). Called after aggregation and before
        ``generic_predictors`` and the clients' evaluation; returns extra arrays for this round's evaluate messages
        (merged into ``ctx.received``; not sent with train messages)."""
        return {}

    def generic_predictors(self, model: torch.nn.Module) -> dict[str, Predictor]:
        model.eval()
        return {"model": model}

    def diagnostics(self, model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
        """Extra scalars about the global model, logged with every evaluation under the returned keys (``x``: the
        balanced test images; e.g. FedLoGe's feature norms and head row norms)."""
        return {}

    def server_state(self) -> dict:
        return {}

    def load_server_state(self, state: dict) -> None:
        pass

    # -------------------------------------------------------------------------- used by the core
    def is_shared(self, key: str) -> bool:
        """The client side's rule (:meth:`ClientAlgorithm.is_shared`): what the global arrays hold."""
        return self.client_cls.is_shared(key)

    def initial_arrays(self, model: torch.nn.Module) -> ArrayRecord:
        """Build the frozen arrays (kept in ``self.frozen``) and return the first shared arrays."""
        self.frozen = self.frozen_arrays(model)
        return ArrayRecord({k: v.detach().clone() for k, v in model.state_dict().items()
                            if self.client_cls.is_shared(k)})

    @staticmethod
    def merge(old: ArrayRecord, new: ArrayRecord | None) -> ArrayRecord:
        """Aggregated keys replace the old ones; keys no client returned keep their value; dtypes are kept
        (an average turns integer buffers such as BatchNorm's counter into floats)."""
        if new is None:
            return old
        out = {}
        for k, a in old.items():
            if k in new:
                v = new[k].numpy()
                out[k] = Array(np.asarray(np.round(v) if np.issubdtype(a.numpy().dtype, np.integer) else v,
                                          dtype=a.numpy().dtype))
            else:
                out[k] = a
        return ArrayRecord(out)

    def personalized_metrics(self, replies: list[Message], mask_default: bool) -> tuple[dict, dict]:
        """Per-client records -> personalized metrics for every predictor, masked and unmasked (mean over ALL
        responding clients, unweighted, plus spread; see fedlt.eval.personalized). Returns (scalars, detail)."""
        records = [dict(next(iter(r.content.metric_records.values()))) for r in replies]
        return personalized_metrics(records, mask_default)

    def generic_metrics(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        batch_size: int, evaluation: GenericEvaluation | None = None) -> tuple[dict, dict]:
        """Every generic predictor on the balanced test set (see fedlt.eval.generic), plus the post-hoc ones when
        ``eval.posthoc.enabled`` (fedlt.eval.posthoc): the primary predictor corrected by the global training prior
        (``<primary>+prior``; needs ``evaluation``'s training counts) and the tau-normalised shared linear head
        (``taunorm``)."""
        evaluation = evaluation or GenericEvaluation(y, num_classes)
        predictors = posthoc.with_prior_correction(self.generic_predictors(model), evaluation.train_counts, self.cfg)
        predictors = posthoc.with_tau_norm(predictors, model, self.cfg, self.client_cls.is_shared("head.weight"))

        def logits():
            for name, fn in predictors.items():
                with torch.no_grad():
                    yield name, predict_logits(fn, x, batch_size)

        return evaluation.evaluate(logits(), several=len(predictors) > 1)

    @staticmethod
    def decoupled_heads(replies: list[Message]) -> dict[str, torch.Tensor]:
        """``eval.decoupled``'s generic cRT/LWS: the n_k-weighted mean of the heads and scales in the clients'
        evaluate replies (n_k: the client's training size; fedlt.train.decoupled.average_heads); {} for none."""
        uploads = []
        for r in replies:
            rec = r.content.array_records.get("arrays")
            if rec is None or not all(k in rec for k in decoupled.GENERIC_KEYS):
                continue
            n_k = float(sum(next(iter(r.content.metric_records.values()))["train-total"]))
            uploads.append(({k: torch.from_numpy(np.array(rec[k].numpy())) for k in decoupled.GENERIC_KEYS}, n_k))
        return decoupled.average_heads(uploads)

    def decoupled_metrics(self, model: torch.nn.Module, replies: list[Message], x: torch.Tensor, y: torch.Tensor,
                          batch_size: int, evaluation: GenericEvaluation) -> tuple[dict, dict]:
        """The generic (federated) ``crt`` and ``lws`` predictors (fedlt.train.decoupled) on the balanced test set,
        from the clients' evaluate replies: ``generic/crt/<metric>``, ``generic/lws/<metric>`` beside the
        strategy's own generic predictors (whose keys are untouched); ({}, {}) when no reply carries them."""
        heads = self.decoupled_heads(replies)
        if not heads:
            return {}, {}
        model.eval()

        def logits():
            for name, fn in decoupled.generic_predictors(model, heads).items():
                with torch.no_grad():
                    yield name, predict_logits(fn, x, batch_size)

        return evaluation.evaluate(logits(), several=True, primary=False)
