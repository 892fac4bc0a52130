"""Shared-backbone personalized evaluation (``eval.personalized_path``): every client's personalized predictors
scored on the server from ONE pass of the global model over the balanced test split.

The federated path sends every client an ``evaluate`` message; each client rebuilds the model, normalises its
local test set and runs its predictors (:func:`fedlt.core.client_step.evaluate`). When every predictor is
``head(h)`` on features h of a submodule that no client personalizes (``ClientAlgorithm.shared_features`` /
``personal_heads``), and each local test set is a subset of the balanced test split
(``eval.local_test=proportional``), the same numbers come from h of the balanced split, computed once: the
generic evaluation reuses them (:meth:`SharedEvaluation.features`: the submodule's forward returns the cached
rows for slices of the test tensor), then each client's personal state (held by the server,
:mod:`fedlt.core.client_state`) is loaded into the server's model and its heads run on its rows of h. The
per-client records are :func:`fedlt.eval.predict.client_eval_record`, as the client step builds them, and no
evaluate message is sent.

What keeps a run on the federated path (``auto``), or refuses ``shared_backbone`` (:func:`problem`): a client
predictor that is not a head on shared features (personal fine-tuning, ``personalization.finetune_epochs`` for
methods without their own step, per-client backbones or BatchNorm, predictors without ``personal_heads``),
``eval.decoupled``, eval uploads, held-out local test sets, fault injection in the evaluate phase, and clients
that keep their own state (the server cannot read it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from torch import nn

from fedlt.api.client import ClientAlgorithm, ClientContext
from fedlt.core import personalize
from fedlt.core.client_state import PERSONAL, STATE, ClientStateStore
from fedlt.core.client_step import device_for
from fedlt.data.augment import to_float
from fedlt.data.federated import ClientData, DataPlan, open_plan
from fedlt.eval.posthoc import with_prior_correction
from fedlt.eval.predict import client_eval_record, predict_logits
from fedlt.seeding import EVAL, derive_seed, torch_generator

log = logging.getLogger("fedlt")

PATHS = ("auto", "federated", "shared_backbone")
AUTO, FEDERATED, SHARED = PATHS


def path_option(cfg: dict) -> str:
    """``eval.personalized_path``; absent (a run directory written before the option existed): federated."""
    return str(cfg["eval"].get("personalized_path") or FEDERATED)


def owner(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO that defines attribute ``name``."""
    return next(c for c in cls.__mro__ if name in vars(c))


def config_problem(cfg: dict, client_cls: type[ClientAlgorithm]) -> str:
    """Why the run's options or the algorithm's class keep personalized evaluation federated ("" = they do not)."""
    e = cfg["eval"]
    if e.get("local_test", "proportional") != "proportional":
        return (f"eval.local_test={e['local_test']} holds each client's local test set out of its own training "
                f"share, so it is not a subset of the balanced test split")
    if personalize.applies(client_cls, cfg):
        return (f"personalization.finetune_epochs={cfg['personalization']['finetune_epochs']} fine-tunes a copy of "
                f"the model on every client before its local test")
    if (e.get("decoupled") or {}).get("enabled"):
        return "eval.decoupled.enabled=true re-trains heads on every client's own features"
    if client_cls.uses_eval_uploads():
        return "its clients send eval uploads (statistics of their own data) in every evaluation round"
    fi = cfg.get("fault_injection") or {}
    if float(fi.get("probability", 0) or 0) > 0 and fi.get("phase", "train") in ("evaluate", "any"):
        return (f"fault_injection.phase={fi['phase']} injects client failures into the evaluate messages, which "
                f"this path does not send")
    predictors, heads = owner(client_cls, "predictors"), owner(client_cls, "personal_heads")
    if not issubclass(heads, predictors):
        return (f"{predictors.__name__}.predictors is not split into shared features and personal heads "
                f"(no personal_heads override beside it)")
    return ""


def model_problem(algo: ClientAlgorithm, model: nn.Module) -> str:
    """Why the algorithm's feature submodule of ``model`` is not shared by all clients ("" = it is)."""
    features = algo.shared_features(model)
    if features is None:
        return "its predictors are not a head on features shared by every client (e.g. a fine-tuned copy)"
    inside = {id(t) for t in features.state_dict(keep_vars=True).values()}
    personal = [k for k, t in model.state_dict(keep_vars=True).items()
                if id(t) in inside and algo.is_personal(k)]
    if personal:
        return (f"its feature extractor holds personal arrays ({', '.join(personal[:3])}"
                f"{', ...' if len(personal) > 3 else ''}), so every client has its own features")
    return ""


def problem(cfg: dict, client_cls: type[ClientAlgorithm], model: nn.Module) -> str:
    """Why the shared-backbone path cannot give the federated path's records for this run ("" = it can)."""
    return config_problem(cfg, client_cls) or model_problem(client_cls(cfg), model)


class SharedEvaluation:
    """The shared-backbone path of one run (built by the round loop when it applies, see :meth:`for_run`)."""

    def __init__(self, cfg: dict, plan: DataPlan, client_cls: type[ClientAlgorithm], model: nn.Module):
        self.cfg, self.plan = cfg, plan
        self.algo = client_cls(cfg)
        # a never-trained client's personal parts are at the run's initial values (as the client step loads them)
        self.init_personal = {k: v.detach().clone() for k, v in model.state_dict().items()
                              if client_cls.is_personal(k)}
        self.batch = int(cfg["eval"]["batch_size"])
        self.device = server_pass_device(cfg)
        self.h: torch.Tensor | None = None
        self.views: dict[int, tuple[ClientData, np.ndarray]] = {}

    @classmethod
    def for_run(cls, cfg: dict, plan: DataPlan, client_cls: type[ClientAlgorithm], model: nn.Module,
                server_holds_state: bool) -> SharedEvaluation | None:
        """The path this run's personalized evaluation takes: a SharedEvaluation, or None (federated)."""
        wanted = path_option(cfg)
        if wanted == FEDERATED:
            return None
        why = problem(cfg, client_cls, model)
        if not why and not server_holds_state:
            why = "the clients keep their personal state themselves, where the server cannot read it"
        if not why and plan.local_test_split != "test":
            why = "the local test sets are not drawn from the balanced test split"
        if why:
            (log.warning if wanted == SHARED else log.info)(
                "personalized evaluation: federated (one evaluate message per client): %s", why)
            return None
        log.info("personalized evaluation: shared backbone (one pass over the balanced test split, on the server)")
        return cls(cfg, plan, client_cls, model)

    # ---------------------------------------------------------------------------- the one backbone pass
    @contextmanager
    def features(self, model: nn.Module, test_x: torch.Tensor) -> Iterator[None]:
        """Compute the shared features of ``test_x`` once (batches of ``eval.batch_size``, as the generic
        evaluation runs); inside the block the feature submodule returns those rows for any row slice of
        ``test_x`` (the generic predictors' batches), and runs as usual on anything else."""
        module = self.algo.shared_features(model.eval())
        if self.device != "cpu":
            module.to(self.device)
        try:  # the generic evaluation's own batches: on the CPU, its very values
            self.h = predict_logits(module, test_x, self.batch, self.device)
        finally:
            if self.device != "cpu":
                module.to("cpu")
        h, base = self.h, test_x
        had = "forward" in vars(module)
        original = module.forward

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            rows = row_slice(x, base)
            if rows is None or args or kwargs:
                return original(x, *args, **kwargs)
            return h[rows]

        module.forward = forward
        try:
            yield
        finally:
            self.h = None  # not kept between evaluation rounds
            if had:
                module.forward = original
            else:
                del module.forward

    # ------------------------------------------------------------------------------- every client's heads
    def replies(self, rnd: int, model: nn.Module, node_of_client: dict[int, int], states: ClientStateStore,
                received: dict[str, torch.Tensor]) -> list[Message]:
        """Every client's evaluate record (all keys of ``node_of_client``, sorted by client id), as its evaluate
        reply would carry it: its personal state loaded into ``model`` (which holds the round's global arrays), its
        heads on its rows of the shared features; ``received``: what its evaluate message would carry as
        ``ctx.received``. Call inside :meth:`features`. ``model``'s personal arrays are back at their initial
        values afterwards."""
        assert self.h is not None, "replies() needs the shared features: call it inside features()"
        seed = int(self.cfg["seed"])
        out = []
        threads = torch.get_num_threads()
        with torch.random.fork_rng(devices=[]):  # the clients' seeding must not move the server's RNG stream
            try:
                # the clients' thread count (backend.torch_threads): small head products, as a client runs them
                torch.set_num_threads(int(self.cfg["backend"].get("torch_threads") or 1))
                for cid in sorted(node_of_client):
                    data, rows = self.view(cid)
                    records = states.records.get(cid, {})
                    model.load_state_dict(self.init_personal, strict=False)
                    if PERSONAL in records:
                        model.load_state_dict(records[PERSONAL].to_torch_state_dict(), strict=False)
                    state = dict(records[STATE].to_torch_state_dict()) if STATE in records else {}
                    torch.manual_seed(derive_seed(seed, EVAL, rnd, cid))  # as the client step seeds
                    ctx = ClientContext(model=model, data=data, cfg=self.cfg, round=rnd,
                                        generator=torch_generator(seed, EVAL, rnd, cid), state=state,
                                        received=dict(received))
                    heads = with_prior_correction(self.algo.personal_heads(ctx), data.train_counts, self.cfg)
                    h = self.h[torch.from_numpy(rows)]
                    logits = ((name, predict_logits(fn, h, self.batch)) for name, fn in heads.items())
                    record = client_eval_record(cid, data.test_y, data.test_counts, data.train_counts,
                                                self.plan.num_classes, logits)
                    out.append(Message(RecordDict({"metrics": MetricRecord(record)}),
                                       dst_node_id=node_of_client[cid], message_type=MessageType.EVALUATE))
            finally:
                torch.set_num_threads(threads)
                model.load_state_dict(self.init_personal, strict=False)
        return out

    def view(self, cid: int) -> tuple[ClientData, np.ndarray]:
        """Client ``cid``'s labels and counts (no images) and its local test rows of the balanced test split."""
        if cid not in self.views:
            self.views[cid] = label_view(self.plan, cid)
        return self.views[cid]


def label_view(plan: DataPlan, cid: int) -> tuple[ClientData, np.ndarray]:
    """A client's data view without images (what :func:`fedlt.data.federated.client_data` gives, with empty
    ``train_x`` / ``test_x``) and its local test set's indices into the balanced test split."""
    source, split = open_plan(plan)
    tr, te = split.client_train[cid], np.asarray(split.client_test[cid], dtype=np.int64)
    k = plan.num_classes
    train_y = (split.noisy_labels[cid] if split.noisy_labels is not None else source.train_y[tr])
    train_y = torch.from_numpy(np.array(train_y, dtype=np.int64))
    test_y = torch.from_numpy(np.array(source.test_y[te], dtype=np.int64))
    x0 = np.array(source.test_x[te[:0]])
    data = ClientData(client_id=cid, train_x=torch.from_numpy(np.array(source.train_x[tr[:0]])), train_y=train_y,
                      test_x=to_float(torch.from_numpy(x0), plan.mean, plan.std), test_y=test_y,
                      train_counts=torch.bincount(train_y, minlength=k),
                      test_counts=torch.bincount(test_y, minlength=k), plan=plan)
    return data, te


def server_pass_device(cfg: dict) -> str:
    """Where the server's one backbone pass runs: the clients' GPU when the run trains on one
    (``backend.device`` / ``num_gpus_per_client``) and the driver sees it -- at ResNet-18 size the pass over
    10,000 test images takes about a minute on 2 CPU threads --, else the CPU. The heads stay on the CPU."""
    device = device_for(cfg["backend"])
    return device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


def row_slice(x: torch.Tensor, base: torch.Tensor) -> slice | None:
    """The slice ``s`` when ``x`` is ``base[s]``, a view of rows of ``base`` (contiguous, the generic batches, or
    strided, e.g. FedLoGe's diagnostics on every k-th test image), else None."""
    if (x.device != base.device or x.dtype != base.dtype or x.dim() != base.dim() or x.shape[1:] != base.shape[1:]
            or x.stride()[1:] != base.stride()[1:]
            or x.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()):
        return None
    offset = x.storage_offset() - base.storage_offset()
    row = base.stride(0)
    if row <= 0 or offset < 0 or offset % row:
        return None
    step = 1 if x.shape[0] <= 1 else x.stride(0) // row
    if step <= 0 or (x.shape[0] > 1 and x.stride(0) % row):
        return None
    start = offset // row
    stop = start + max(x.shape[0] - 1, 0) * step + 1 if x.shape[0] else start
    return slice(start, stop, step) if stop <= base.shape[0] else None
