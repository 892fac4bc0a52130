"""What an algorithm author sees, client side: :class:`ClientAlgorithm` and the :class:`ClientContext` it gets.

An algorithm (one file in ``strategies/``) is a pair:

* a **client side**, a subclass of :class:`ClientAlgorithm`: plain Python and torch, no Flower, no Ray.
  It trains the model it is handed (``train``) and says how the client predicts (``predictors``).
  Class attributes declare which model state is personal (kept per client, never uploaded) and which is
  frozen (built once by the server, sent once, never trained or uploaded).
* a **server side**, a subclass of :class:`fedlt.api.server.ServerAlgorithm`: it says what is sent
  (``train_config``, ``frozen_arrays``), how replies are aggregated (``aggregate``: Flower's sample-weighted
  average by default) and how the global model predicts (``generic_predictors``).

Everything else -- sampling, seeding, messaging, evaluation, logging, checkpoints, Ray -- belongs to
``fedlt.core`` (the round loop and the one client step) and ``fedlt.flower`` (Flower + Ray), and is identical for
every algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fedlt.data.federated import ClientData
from fedlt.privacy.params import DPSGD
from fedlt.privacy.params import mode as privacy_mode
from fedlt.train import feature_smote
from fedlt.train.local import run_local_epochs, sgd, supervised_step
from fedlt.train.losses import build_loss, loss_terms, masked_loss

Predictor = Callable[[torch.Tensor], torch.Tensor]
PHASE = "batched.phase"  # client batching: the phase's index among the terms of a multi-phase update
MEMORY = "memory."  # client batching: a client's batched_memory among its terms (algorithms with batched_collect)
RANDOM = "batched.random"  # client batching: this step's batched_random draw among the terms


@dataclass
class ClientContext:
    """What the client side sees for one train or evaluate call.

    ``model`` already holds: the initial weights, then the frozen arrays, then the global arrays, then this
    client's personal model state. ``state`` is the client's other persistent tensors (e.g. Ditto's personal
    model), saved back after the call. ``generator`` is derived from (seed, round, client id). ``data`` carries
    the run's client sampler (``data.sampler``: the core attaches it; fedlt.train.samplers)."""

    model: nn.Module
    data: ClientData
    cfg: dict  # the whole validated run config (read-only)
    round: int
    generator: torch.Generator
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    device: str = "cpu"
    # extra arrays for this train reply besides the shared model state (e.g. CReFF's per-class gradients), under
    # keys that are not model keys; the server side must remove them before averaging
    uploads: dict[str, torch.Tensor] = field(default_factory=dict)
    # extra arrays the server sent with this round's global arrays (``ServerAlgorithm.round_arrays``, e.g.
    # SCAFFOLD's server control variate, FedProto's global prototypes); read-only
    received: dict[str, torch.Tensor] = field(default_factory=dict)
    # client batching only, in ``batched_end``: this client's ``batched_memory`` after its last step
    memory: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def strategy(self) -> dict:
        return self.cfg["strategy"]


class ClientAlgorithm:
    """Client side of FedAvg; subclass it and override what differs.

    Hooks:
      * ``build_model(base, cfg)`` -- wrap the configured backbone+head model (add heads, freeze parts).
      * ``train(ctx) -> metrics`` -- the local update; mutate ``ctx.model`` / ``ctx.state`` in place.
      * ``predictors(ctx) -> {name: fn}`` -- the personalized model(s); the first is the primary one.
      * ``personal_prefixes`` / ``frozen_prefixes`` -- model state keys (by prefix) that stay on the client /
        come from the server once.
      * ``extra_uploads`` -- what ``ctx.uploads`` carries, in words ("" = nothing besides the shared model
        arrays). Client-level DP (``privacy=dp_central|dp_local``) clips and noises only the model update, so it
        refuses algorithms that declare extra uploads, naming them.
      * ``dp_sgd_ready`` -- sample-level DP (``privacy=dp_sgd``) replaces ``local_epochs`` by DP-SGD
        (:mod:`fedlt.privacy.dp_sgd`). A class that overrides ``train`` sets ``dp_sgd_ready = True`` in its own
        body only when its whole local update is ONE ``local_epochs`` call of the run's ``local_epochs`` epochs
        (plus, at most, a data-independent ``extra`` term); otherwise ``dp_sgd`` is refused for it (and so is
        ``feature_smote``, which lives in that one call's step).
      * ``eval_uploads(ctx) -> {key: tensor}`` -- statistics of the received global model on the client's data,
        asked of EVERY client (sampled or not) at each evaluation round, before the server scores anything (e.g.
        CCVR's per-class feature means / covariances / counts). Overriding it makes the core run one extra
        evaluate exchange per evaluation round (the "eval-uploads" pass) whose replies go to
        :meth:`fedlt.api.server.ServerAlgorithm.after_eval_uploads`; the default (no override) costs nothing.
        They are uploads besides the model update: declare them in ``extra_uploads`` too (DP refuses the run).
      * ``shared_features(model)`` / ``personal_heads(ctx)`` -- the split of ``predictors`` that lets the server
        score every client's predictors on ONE backbone pass over the balanced test split
        (``eval.personalized_path``, :mod:`fedlt.core.shared_eval`): ``shared_features`` returns the submodule
        of the global model every predictor starts from (its output h), or None when there is no such split;
        ``personal_heads`` returns {name: fn(h) -> logits} such that ``predictors(ctx)[name](x) ==
        personal_heads(ctx)[name](shared_features(ctx.model)(x))``, same names, same order. The default (whole
        model, identity head) matches the default ``predictors``. A class that overrides ``predictors`` must
        override ``personal_heads`` in the same class (or below) or it stays on the federated path; the
        submodule must hold no personal array (checked). On that path ``ctx.model`` holds this client's
        personal state, ``ctx.state`` its extra state, and ``ctx.data`` its labels and counts but no images.
      * ``batched_ready`` and the ``batched_*`` hooks -- the same local update written for client batching
        (``backend.client_batching``, :mod:`fedlt.core.cohort`: a round's clients trained as ONE vmapped
        computation): ``batched_begin``, ``batched_terms``, ``batched_groups`` / ``batched_phases`` /
        ``batched_phase_start``, ``batched_loss``, ``batched_grads``, ``batched_memory`` /
        ``batched_accumulate`` / ``batched_collect``, ``batched_random``, ``batched_metrics``, ``batched_end``.
        The default hooks are ``train``'s plain local SGD with ``loss=``.
        A class that overrides ``train`` or ``loss_fn`` sets ``batched_ready = True`` in its own body only when
        its ``batched_*`` hooks reproduce that update (tests/core/test_cohort.py checks batched == sequential
        for every strategy); otherwise client batching is refused for it, naming the method and, when that
        class sets ``batched_refusal`` (a phrase: why the update has no batched form), that reason.
    """


    personal_prefixes: tuple[str, ...] = ()
    frozen_prefixes: tuple[str, ...] = ()
    extra_uploads: str = ""
    dp_sgd_ready: bool = True  # read from the class that defines ``train`` (fedlt.validate; see above)
    batched_ready: bool = True  # read from the classes that define ``train`` and ``loss_fn`` (fedlt.core.cohort)
    batched_refusal: str = ""  # why not, read from the same class when it is not batched_ready (fedlt.core.cohort)

    # ------------------------------------------------------------------ what travels (the one rule)
    @classmethod
    def is_personal(cls, key: str) -> bool:
        return key.startswith(cls.personal_prefixes) if cls.personal_prefixes else False

    @classmethod
    def is_frozen(cls, key: str) -> bool:
        return key.startswith(cls.frozen_prefixes) if cls.frozen_prefixes else False

    @classmethod
    def is_shared(cls, key: str) -> bool:
        """Sent by the server every round and uploaded by the client: neither personal nor frozen."""
        return not cls.is_personal(key) and not cls.is_frozen(key)

    @classmethod
    def personalization_stage(cls, cfg: dict) -> str:
        """Recorded in results.json: "before" when ``predictors`` evaluate the received global model as is,
        "after" when they apply a personalization step first (fine-tuning, personal heads)."""
        return "before"

    @staticmethod
    def build_model(base: nn.Module, cfg: dict) -> nn.Module:
        return base

    def __init__(self, cfg: dict):
        self.cfg = cfg

    # ---------------------------------------------------------------------------------------- training
    def loss_fn(self, ctx: ClientContext):
        """The client loss selected with ``loss=NAME`` (built on this client's class counts; the round drives
        schedules such as LDAM's deferred re-weighting)."""
        return build_loss(ctx.cfg.get("loss"), counts=ctx.data.train_counts.float(), round=ctx.round,
                          num_rounds=int(ctx.cfg["num_rounds"]))

    def local_epochs(self, ctx: ClientContext, model: nn.Module, params, extra=None, epochs=None) -> dict:
        """Plain supervised local SGD on ``params`` of ``model`` with the run's optimizer settings (under
        ``privacy=dp_sgd``: DP-SGD, :func:`fedlt.privacy.dp_sgd.train_epochs`; with ``feature_smote.ratio`` set:
        the head's loss over each batch plus SMOTE features of its tail classes, :mod:`fedlt.train.feature_smote`)."""
        if privacy_mode(ctx.cfg) == DPSGD:
            from fedlt.privacy.dp_sgd import train_epochs

            return train_epochs(ctx, model, list(params), self.loss_fn(ctx), extra, epochs)
        opt = sgd(params, ctx.cfg["optimizer"])
        smote = feature_smote.options(ctx.cfg)  # feature_smote.ratio: SMOTE features in the head's loss
        step = (supervised_step(model, opt, self.loss_fn(ctx), extra) if smote is None else
                feature_smote.smote_step(model, opt, self.loss_fn(ctx), ctx.data.train_counts, smote,
                                         feature_smote.generator(ctx.cfg, ctx.round, ctx.data.client_id), extra))
        return run_local_epochs(ctx.data, int(ctx.cfg["local_epochs"] if epochs is None else epochs),
                                int(ctx.cfg["batch_size"]), ctx.generator, step, ctx.device)

    def train(self, ctx: ClientContext) -> dict[str, float]:
        ctx.model.train()
        return self.local_epochs(ctx, ctx.model, [p for p in ctx.model.parameters() if p.requires_grad])

    # ------------------------------------------------------------- client batching (backend.client_batching)
    def batched_begin(self, ctx: ClientContext) -> None:
        """Client batching: what ``train`` does for this client before its first batch (e.g. initialise a
        personal head, or compute an upload from the received model, e.g. CReFF's). ``ctx.model`` holds the
        client's start state; only personal state, ``ctx.state`` and ``ctx.uploads`` may change here (the shared
        start state is the same for every client of the cohort). It runs before the client's batches are drawn,
        so it may consume ``ctx.generator`` as ``train`` does before its first batch."""

    def batched_terms(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        """Client batching: this client's tensors for :meth:`batched_loss` (stacked over the cohort and vmapped;
        the same keys and shapes for every client). Default: ``loss=`` as data
        (:func:`fedlt.train.losses.loss_terms` on the client's counts and the round), what ``loss_fn`` builds."""
        return loss_terms(ctx.cfg.get("loss"), counts=ctx.data.train_counts.float(), round=ctx.round,
                          num_rounds=int(ctx.cfg["num_rounds"]))

    def batched_groups(self, model: nn.Module, cfg: dict) -> list[tuple[tuple[str, ...], dict]]:
        """Client batching: the parameter groups of the local update, (key prefixes, optimizer settings {lr,
        momentum, weight_decay}), one SGD per group as in ``train`` (disjoint groups with their own SGD are one
        optimizer with per-group settings). A trainable parameter goes to the first group whose prefixes match
        (``()``: every one); one in no group is not trained. Default: every trainable parameter, ``optimizer``."""
        return [((), cfg["optimizer"])]

    def batched_phases(self, model: nn.Module, cfg: dict) -> list[tuple[int, list[tuple[tuple[str, ...], dict]]]]:
        """Client batching: the local update as phases run one after another, each (epochs, parameter groups as
        in :meth:`batched_groups`) with fresh SGD state, every client's batches continuing from its generator,
        e.g. FedRep's head epochs then body epochs. Default: one phase, ``local_epochs`` epochs of
        :meth:`batched_groups`."""
        return [(int(cfg["local_epochs"]), self.batched_groups(model, cfg))]

    def batched_phase_start(self, ctx: ClientContext, phase: int, start: dict[str, torch.Tensor],
                            previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Client batching: the state dict this client trains phase ``phase`` of :meth:`batched_phases` from, given
        its start state of the whole update (``start``) and the state the previous phase ended with
        (``previous``; phase 0: ``start``); it may keep a phase's result in ``ctx.state`` (e.g. Ditto's personal
        model, trained first from its own state, then the global model from the received one). In a multi-phase
        update every client's terms carry the phase index under ``PHASE`` (a 0-d float tensor), so that
        :meth:`batched_loss` can tell the phases apart. Default: ``previous``."""
        return previous

    def batched_metrics(self, phases: list[dict[str, float]]) -> dict[str, float]:
        """Client batching: one client's metrics from its metrics of each phase of :meth:`batched_phases` (what
        ``train`` reports). Default: the last phase's, with "train/steps" and "train/samples" summed."""
        if len(phases) == 1:
            return phases[0]
        return {**phases[-1], **{k: sum(p.get(k, 0.0) for p in phases) for k in ("train/steps", "train/samples")}}

    def batched_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                     terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Client batching: ONE client's batch, as a pure function run under ``torch.func`` (grad, vmap over
        the cohort). ``model`` holds this client's parameters and buffers (call it and its submodules as
        usual; BatchNorm updates this client's statistics); ``x``/``y`` the batch padded to ``batch_size`` with
        ``weight`` 1 for real samples, 0 for padding (reduce with it: :func:`fedlt.train.losses.masked_loss`);
        ``terms`` this client's :meth:`batched_terms`. Returns (objective, metrics): the gradient of the
        objective w.r.t. each trained parameter must be what ``train`` steps that parameter with on this batch
        (losses of other groups reach it only through ``detach``), and ``metrics`` (scalars, averaged over the
        steps) should hold what ``train`` reports, "train/loss" first; tensors of other shapes in ``metrics``
        are not averaged but handed to :meth:`batched_collect`; with :meth:`batched_collect` overridden,
        ``terms`` also hold the client's current :meth:`batched_memory` (keys prefixed ``MEMORY``). No
        data-dependent Python control flow, no ``.item()``."""
        loss = masked_loss(terms, model(x), y, weight)
        return loss, {"train/loss": loss}

    def batched_grads(self, grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                      terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Client batching: ONE client's gradients of :meth:`batched_loss`'s objective (``grads``, by parameter
        name, every trained parameter) -> what its SGD steps with, before the group's weight decay and momentum
        (e.g. FedDyn's gradient clipping and per-client weight decay). A pure function under ``vmap`` like
        :meth:`batched_loss`: ``params`` this client's trained parameters before the step, ``terms`` its
        :meth:`batched_terms`; no ``.item()``, no data-dependent Python control flow. Default: unchanged (not
        called at all unless overridden)."""
        return grads

    def batched_memory(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        """Client batching: this client's running tensors carried from step to step (stacked over the cohort and
        vmapped like :meth:`batched_terms`; the same keys and shapes for every client), their values before the
        first step, e.g. a gradient sum and a step count (SCAFFOLD's c_i+). Each step replaces them by
        :meth:`batched_accumulate`; ``batched_end`` finds the final values in ``ctx.memory``. Default: none."""
        return {}

    def batched_accumulate(self, memory: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                           params: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
        """Client batching: ONE client's :meth:`batched_memory` after one of its steps, from the step's gradients
        of :meth:`batched_loss`'s objective (before :meth:`batched_grads`), its parameters before the step and its
        terms; a pure function under ``vmap`` (run only at the client's own steps). Default: unchanged."""
        return memory

    def batched_collect(self, memory: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                        epoch: torch.Tensor, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Client batching: ONE client's :meth:`batched_memory` after one of its steps, from what its
        :meth:`batched_loss` returned in ``metrics`` at that step (``outputs``, e.g. per-class sums of the batch's
        features, computed before the step's update as ``train`` computes them) and the local epoch the step
        belongs to (``epoch``, a 0-d tensor from 0); a pure function under ``vmap`` (run only at the client's
        own steps, after :meth:`batched_accumulate`). Default: unchanged (not called unless overridden)."""
        return memory

    def batched_random(self, ctx: ClientContext) -> tuple[torch.Generator, tuple[int, ...]] | None:
        """Client batching: (generator, shape) when ``train`` draws ``torch.rand(shape, generator=...)`` once per
        local step from a generator of its own (not ``ctx.generator``, whose batch draws are taken up front): the
        trainer draws them in the same order and hands each step's to :meth:`batched_loss` as ``terms[RANDOM]``
        (vmap itself refuses random draws). Default: None (no draws)."""
        return None

    def batched_end(self, ctx: ClientContext) -> None:
        """Client batching: what ``train`` does for this client after its last batch (e.g. copy a head, mark
        ``ctx.state``, fill ``ctx.uploads``); ``ctx.model`` holds the client's trained state, ``ctx.memory`` its
        final :meth:`batched_memory`. ``ctx.uploads`` reach the server only when it gets every client's own
        reply (its own ``aggregate``; otherwise such an algorithm is refused)."""

    # -------------------------------------------------------------------------------------- evaluation
    def eval_uploads(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        """Arrays this client sends in the eval-uploads pass of an evaluation round (see the class docstring):
        ``ctx.model`` holds the round's global model (with this client's personal state), ``ctx.data`` its data;
        keys must not be model keys. Not overridden (the default): no such pass."""
        return {}

    @classmethod
    def uses_eval_uploads(cls) -> bool:
        """Does the core run the eval-uploads pass for this algorithm (``eval_uploads`` is overridden)?"""
        return cls.eval_uploads is not ClientAlgorithm.eval_uploads

    def predictors(self, ctx: ClientContext) -> dict[str, Predictor]:
        ctx.model.eval()
        return {"model": ctx.model}

    def shared_features(self, model: nn.Module) -> nn.Module | None:
        """The submodule of ``model`` whose output every personalized predictor starts from, the same for every
        client (see the class docstring); None = no such split (the federated path). Default: the whole model."""
        return model

    def personal_heads(self, ctx: ClientContext) -> dict[str, Predictor]:
        """This client's ``predictors`` as functions of ``shared_features(ctx.model)``'s output (see the class
        docstring). Default: the identity (the default predictor is the whole model)."""
        ctx.model.eval()
        return {"model": lambda h: h}
