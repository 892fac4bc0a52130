"""Every check of a run config, in one place, run once before anything is written and before Ray starts.

:func:`validate` takes the resolved Hydra config (a plain dict) and raises :class:`fedlt.config.ConfigError`
with one paragraph naming the bad value and what is allowed. It calls the checks that the lower layers
declare (data options: ``fedlt.data.validate``; losses: ``fedlt.train.losses.validate_loss``; each strategy:
its ``Server.params`` dataclass and optional ``Server.validate_config``); nothing below this module imports
it. :func:`validate_prepared` runs the checks that need the prepared data (still before Ray starts).

The rule for every option: numbers are finite and in range, booleans are booleans, enumerations are one of
their values, keys are known, sizes are consistent with the data and the machine."""

from __future__ import annotations

import os

from fedlt.api.server import ServerAlgorithm
from fedlt.config import (ConfigError, check_bool, check_choice, check_float, check_int, check_params,
                          clients_per_round, fail, get, param_defaults)
from fedlt.core.cohort import check_supported
from fedlt.core.personalize import PersonalizationParams
from fedlt.core.shared_eval import PATHS as PERSONALIZED_PATHS
from fedlt.core.shared_eval import SHARED as SHARED_PATH
from fedlt.core.shared_eval import problem as shared_eval_problem
from fedlt.core.faults import FAULT_MODES, FAULT_PHASES, fault_modes
from fedlt.data.local_testsets import LOCAL_TESTS
from fedlt.data.longtail import PROFILES
from fedlt.data.noise import LabelNoiseParams
from fedlt.data.partition import PARTITIONERS
from fedlt.data.sources import SOURCES
from fedlt.data.validate import validate_data
from fedlt.eval.posthoc import PosthocParams
from fedlt.flower.ray_backend import address_problem
from fedlt.models import HEADS, MODELS, NORMS
from fedlt.privacy import CENTRAL, DPSGD, MODES as PRIVACY_MODES, NONE
from fedlt.privacy.params import SecAggParams
from fedlt.train.decoupled import DecoupledParams, model_check
from fedlt.train.feature_smote import FeatureSmoteParams
from fedlt.train.losses import validate_loss
from fedlt.train.samplers import validate_sampler
import strategies
from strategies import get_strategy

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The run config's keys: the top level and its fixed sections (the open groups dataset/partition/model/loss/
# sampler/strategy are checked by their owners). Anything else -- a typo, a `+key=...` -- is refused.
TOP_LEVEL = ("seed", "num_clients", "num_rounds", "participation", "local_epochs", "batch_size", "optimizer", "eval",
             "checkpoint", "resume", "fault_injection", "data_root", "cache_dir", "log_level", "dataset",
             "partition", "model", "strategy", "loss", "sampler", "backend", "privacy", "personalization",
             "server_data", "feature_smote")
SECTIONS = {
    "optimizer": ("lr", "momentum", "weight_decay"),
    "eval": ("every", "batch_size", "mask_absent_classes", "local_test", "holdout_fraction", "test_agnostic",
             "posthoc", "decoupled", "personalized_path"),
    "checkpoint": ("every", "keep", "on_signal"),
    "server_data": ("per_class",),
    "fault_injection": ("probability", "mode", "phase"),
    "backend": ("name", "address", "num_cpus", "num_gpus", "num_cpus_per_client", "num_gpus_per_client", "device",
                "torch_threads", "server_threads", "flush_denormal", "deterministic", "round_timeout_s",
                "startup_timeout_s", "actor_max_restarts", "actor_task_retries", "min_clients_per_round",
                "log_to_driver", "init_args", "client_data_cache_mb", "client_batching", "batching_group",
                "batched_autocast", "malloc_arena_max"),
}
MIN_ROUND_TIMEOUT_S = 1.0  # below this every client "times out" before it could start


def validate(cfg: dict) -> dict:
    """Check every value a run uses; return the config (``log_level`` normalised to upper case)."""
    _known_keys(cfg)
    check_int(cfg, "seed", 0, 2**32 - 1)
    check_int(cfg, "num_clients", 1)
    check_int(cfg, "num_rounds", 1)
    check_float(cfg, "participation", 0.0, 1.0, lo_open=True)
    check_int(cfg, "local_epochs", 1)
    check_int(cfg, "batch_size", 1)
    check_float(cfg, "optimizer.lr", 0.0, lo_open=True)
    check_float(cfg, "optimizer.momentum", 0.0, 1.0, hi_open=True)
    check_float(cfg, "optimizer.weight_decay", 0.0)
    _log_level(cfg)
    _eval(cfg)
    if "personalization" in cfg:
        check_params(cfg, "personalization", PersonalizationParams, ignore=())
    check_choice(cfg, "dataset.source", sorted(SOURCES))
    check_float(cfg, "dataset.imbalance_factor", 1.0)
    check_choice(cfg, "dataset.profile", PROFILES)
    if cfg["dataset"].get("label_noise") is not None:  # absent / null (run directories from before it): clean labels
        check_params(cfg, "dataset.label_noise", LabelNoiseParams, ignore=())
    check_choice(cfg, "partition.name", sorted(PARTITIONERS))
    if "alpha" in cfg["partition"]:
        check_float(cfg, "partition.alpha", 0.0, lo_open=True)
    check_int(cfg, "partition.min_samples_per_client", 0)
    validate_data(cfg)  # the remaining dataset.* / partition.* / holdout options
    if (cfg.get("server_data") or {}).get("per_class") is not None:  # null / absent: the strategy's own size
        check_int(cfg, "server_data.per_class", 0)
    _model(cfg)
    check_choice(cfg, "strategy.name", sorted(strategies.STRATEGIES))  # read now: tests may register more
    validate_loss(cfg)
    validate_sampler(cfg)
    _backend(cfg)
    _reliability(cfg)
    server = get_strategy(cfg["strategy"]["name"])
    check_params(cfg, "strategy", server.params)
    server.validate_config(cfg)  # cross-option rules of the strategy (e.g. FedLoGe needs loss=ce)
    _decoupled(cfg, server)
    _personalized_path(cfg, server)
    _feature_smote(cfg, server)
    if cfg["backend"].get("client_batching"):
        check_supported(cfg, server)
    _privacy(cfg, server)
    return cfg


def validate_prepared(cfg: dict, train_size: int, num_classes: int | None = None) -> None:
    """Checks that need the data (after the long-tail profile or the split is known, before Ray starts): every
    client needs a training sample on average; the strategy's data-dependent rule (e.g. FedLoGe's d >= K)."""
    n = int(cfg["num_clients"])
    if n > train_size:
        raise ConfigError(
            f"invalid value num_clients={n}: the long-tailed training set of dataset={cfg['dataset']['name']} "
            f"(imbalance_factor={cfg['dataset']['imbalance_factor']}) has only {train_size} samples, so at most "
            f"{train_size} clients are possible; lower num_clients or the imbalance factor.")
    if num_classes is not None:
        get_strategy(cfg["strategy"]["name"]).validate_data(cfg, num_classes)


def validate_server_data(cfg: dict, counts) -> int:
    """``server_data.per_class`` against the long-tailed training counts (before the split is drawn): an explicit
    N must leave every class at least one image for the clients; a strategy that needs a server set (e.g. Ratio
    Loss) gets one that fits (fedlt.data.federated.server_set_size). Returns the images per class (0 = none)."""
    from fedlt.data.federated import server_set_size
    from fedlt.data.sources import DataError

    try:
        return server_set_size(cfg, counts)
    except DataError as e:
        raise ConfigError(str(e)) from None


def validate_split(cfg: dict, client_train: list, client_test: list) -> None:
    """Every client needs training data (or it can never contribute) and test data (or its personalized
    accuracy is undefined): a split that leaves clients empty is refused, with the count and what to change."""
    no_train = [c for c, idx in enumerate(client_train) if len(idx) == 0]
    no_test = [c for c, idx in enumerate(client_test) if len(idx) == 0]
    if no_train or no_test:
        def ids(cs: list[int]) -> str:
            return ", ".join(map(str, cs[:8])) + (", ..." if len(cs) > 8 else "")

        parts = [f"{len(no_train)} of {len(client_train)} clients have no training data (clients {ids(no_train)})"
                 if no_train else "",
                 f"{len(no_test)} have no local test data (clients {ids(no_test)})" if no_test else ""]
        raise ConfigError(
            f"invalid partition for num_clients={cfg['num_clients']} with partition={cfg['partition']['name']}"
            + (f" (alpha={cfg['partition']['alpha']})" if "alpha" in cfg["partition"] else "") + ": "
            + "; ".join(p for p in parts if p) + ". Use fewer clients, a larger partition.alpha, or "
            "partition.min_samples_per_client=N (redraws until every client has N samples); `fedlt-data` shows "
            "the split without running it.")


# ------------------------------------------------------------------------------------------ sections
def _known_keys(cfg: dict) -> None:
    unknown = sorted(set(cfg) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]}={cfg[unknown[0]]!r}: fedlt has no such setting (a typo, or "
                          f"a `+key=...` override?); the top-level options are {', '.join(TOP_LEVEL)}.")
    for section, keys in SECTIONS.items():
        node = cfg.get(section)
        if node is None:
            continue
        if not isinstance(node, dict):
            fail(section, node, f"expected a section with the options {', '.join(keys)}")
        extra = sorted(set(node) - set(keys))
        if extra:
            raise ConfigError(f"unknown option {section}.{extra[0]}={node[extra[0]]!r}: the options of {section} "
                              f"are {', '.join(keys)}.")


def _log_level(cfg: dict) -> None:
    level = cfg.get("log_level", "WARNING")
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        fail("log_level", level, f"allowed values are {', '.join(LOG_LEVELS)} (any case)")
    cfg["log_level"] = level.upper()


def _eval(cfg: dict) -> None:
    check_int(cfg, "eval.every", 0)
    check_int(cfg, "eval.batch_size", 1)
    check_bool(cfg, "eval.mask_absent_classes")
    check_choice(cfg, "eval.local_test", LOCAL_TESTS)
    if cfg["eval"].get("personalized_path") is not None:  # absent (run directories from before it): federated
        check_choice(cfg, "eval.personalized_path", PERSONALIZED_PATHS)
    if "test_agnostic" in cfg["eval"]:
        check_bool(cfg, "eval.test_agnostic.enabled")
        ifs = get(cfg, "eval.test_agnostic.imbalance_factors")
        if not isinstance(ifs, list) or not all(isinstance(f, int | float) and not isinstance(f, bool) and f >= 1
                                                for f in ifs):
            fail("eval.test_agnostic.imbalance_factors", ifs, "expected a list of numbers >= 1, e.g. [10, 50]")
    if "posthoc" in cfg["eval"]:
        check_params(cfg, "eval.posthoc", PosthocParams, ignore=())
    if cfg["eval"].get("decoupled") is not None:
        check_params(cfg, "eval.decoupled", DecoupledParams, ignore=())
        d = cfg["eval"]["decoupled"]
        if d.get("smote_ratio") is not None and not d.get("enabled"):
            raise ConfigError(
                f"invalid combination eval.decoupled.smote_ratio={d['smote_ratio']} with eval.decoupled.enabled=false: "
                f"feature SMOTE trains the fsmote head on the frozen features of the decoupled re-training, which is "
                f"off; set eval.decoupled.enabled=true, or leave smote_ratio null.")


def _decoupled(cfg: dict, server) -> None:
    """``eval.decoupled`` re-trains / re-scales a plain linear head on ``features(x)``: refuse strategies whose
    client model has none (checked on a tiny model of the same structure)."""
    if not ((cfg["eval"].get("decoupled") or {}).get("enabled")):
        return
    problem = _linear_head_problem(cfg, server)
    if problem:
        head = cfg["model"].get("head")
        raise ConfigError(
            f"invalid combination eval.decoupled.enabled=true with strategy={cfg['strategy']['name']}"
            f"{' and model.head=' + str(head) if head not in (None, 'linear') else ''}: {problem}. cRT/LWS/feature SMOTE need a backbone followed by a linear head (e.g. fedavg, fedprox, "
            f"fedper, fedrep, fedrod, creff, moon, with model.head=linear); use eval.decoupled.enabled=false.")


def _linear_head_problem(cfg: dict, server, trained_head: bool = False) -> str:
    """Why the strategy's client model is not a backbone ``features(x)`` followed by a plain linear ``head``
    (``trained_head``: that the client trains) ("" = it is), checked on a tiny model of the same structure."""
    import torch

    from fedlt.models import build_model

    probe_cfg = {**cfg["model"], "name": "cnn", "width": 2, "feature_dim": 8}
    probe_cfg.pop("widths", None)
    torch_state = torch.random.get_rng_state()
    try:
        model = server.client_cls.build_model(build_model(probe_cfg, 1, 3), cfg)
        problem = model_check(model, (1, 16, 16))
        if not problem and trained_head and not any(q.requires_grad for q in model.head.parameters()):
            problem = "its head is frozen on the clients, so SMOTE features in the head's loss would train nothing"
        return problem
    finally:
        torch.random.set_rng_state(torch_state)


def _personalized_path(cfg: dict, server) -> None:
    """``eval.personalized_path=shared_backbone`` only where one backbone pass gives the federated records
    (fedlt.core.shared_eval.problem, the model part checked on a tiny model of the same structure)."""
    if cfg["eval"].get("personalized_path") != SHARED_PATH:
        return
    import torch

    from fedlt.models import build_model

    probe_cfg = {**cfg["model"], "name": "cnn", "width": 2, "feature_dim": 8}
    probe_cfg.pop("widths", None)
    torch_state = torch.random.get_rng_state()
    try:
        why = shared_eval_problem(cfg, server.client_cls,
                                  server.client_cls.build_model(build_model(probe_cfg, 1, 3), cfg))
    finally:
        torch.random.set_rng_state(torch_state)
    if why:
        raise ConfigError(
            f"invalid combination eval.personalized_path=shared_backbone with strategy={cfg['strategy']['name']}: "
            f"{why}. The shared-backbone path scores every client's personalized predictors as heads on ONE pass "
            f"of the global model's shared features over the balanced test split, so each client's predictor "
            f"must be its own head on features no client changes (e.g. fedavg, fedprox, fedloge, fedrod, fedper, "
            f"fedrep, fedbabu with strategy.finetune_epochs=0), with eval.local_test=proportional and without "
            f"personalization fine-tuning or eval.decoupled; use eval.personalized_path=auto (it falls back to "
            f"the federated path by itself) or federated.")


def _feature_smote(cfg: dict, server) -> None:
    """``feature_smote`` (fedlt.train.feature_smote): SMOTE features in the head's loss of the one local step, so
    the strategy's local update must be one ``ClientAlgorithm.local_epochs`` call on a backbone + linear head."""
    if cfg.get("feature_smote") is None:  # a run directory written before the option existed: off
        return
    p = check_params(cfg, "feature_smote", FeatureSmoteParams, ignore=())
    if p.ratio is None:
        return
    combo = f"invalid combination feature_smote.ratio={p.ratio} with"
    privacy = (cfg.get("privacy") or {}).get("name", NONE)
    if privacy == DPSGD:
        raise ConfigError(
            f"{combo} privacy=dp_sgd: a SMOTE feature interpolates between two training samples, so the loss has "
            f"no per-sample terms that DP-SGD could clip; use feature_smote.ratio=null, or client-level DP "
            f"(privacy=dp_central or dp_local).")
    if cfg["backend"].get("client_batching"):
        raise ConfigError(
            f"{combo} backend.client_batching=true: the vectorised cohort trainer runs its own step, without the "
            f"SMOTE step; set backend.client_batching=false or feature_smote.ratio=null.")
    from fedlt.api.client import ClientAlgorithm

    client = server.client_cls
    trainer = next(c for c in client.__mro__ if "train" in vars(c))
    looper = next(c for c in client.__mro__ if "local_epochs" in vars(c))
    why = ""
    if not vars(trainer).get("dp_sgd_ready", False):
        why = (f"its local update ({trainer.__name__}.train) is not a single ClientAlgorithm.local_epochs call (its "
               f"own step, extra heads or passes), so the SMOTE step would not be (all of) its training")
    elif looper is not ClientAlgorithm:
        why = f"it replaces the local loop itself ({looper.__name__}.local_epochs)"
    else:
        why = _linear_head_problem(cfg, server, trained_head=True)
    if why:
        head = cfg["model"].get("head")
        raise ConfigError(
            f"{combo} strategy={cfg['strategy']['name']}"
            f"{' and model.head=' + str(head) if head not in (None, 'linear') else ''}: {why}. Feature SMOTE runs "
            f"with strategies whose clients train a backbone + linear head with one plain local_epochs call, e.g. "
            f"fedavg, fedprox, fedavgm, fedadam, fedlc, ccvr, fedper, ratioloss, fedic (model.head=linear); use "
            f"one of those, or feature_smote.ratio=null.")


def _model(cfg: dict) -> None:
    check_choice(cfg, "model.name", MODELS)
    m = cfg["model"]
    if "head" in m:
        check_choice(cfg, "model.head", HEADS)
    if "norm" in m:
        check_choice(cfg, "model.norm", NORMS)
    for key in ("width", "feature_dim"):
        if key in m:
            check_int(cfg, f"model.{key}", 1)
    widths = m.get("widths")
    if widths is not None and (not isinstance(widths, list) or not widths or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
        fail("model.widths", widths, "expected null (the standard widths) or a list of integers >= 1, one per stage")


def _backend(cfg: dict) -> None:
    b = cfg["backend"]
    check_float(cfg, "backend.num_cpus_per_client", 0.0, lo_open=True)
    check_float(cfg, "backend.num_gpus_per_client", 0.0)
    check_int(cfg, "backend.torch_threads", 1)
    if "server_threads" in b:
        check_int(cfg, "backend.server_threads", 1)
    check_float(cfg, "backend.round_timeout_s", MIN_ROUND_TIMEOUT_S)
    check_int(cfg, "backend.min_clients_per_round", 1)
    for key in ("flush_denormal", "deterministic", "log_to_driver", "client_batching"):
        if key in b:
            check_bool(cfg, f"backend.{key}")
    if b.get("startup_timeout_s") is not None:
        check_float(cfg, "backend.startup_timeout_s", MIN_ROUND_TIMEOUT_S)
    for key in ("actor_max_restarts", "actor_task_retries"):
        if b.get(key) is not None:
            check_int(cfg, f"backend.{key}", -1)
    if b.get("num_cpus") is not None:
        check_int(cfg, "backend.num_cpus", 1)
    if b.get("num_gpus") is not None:
        check_float(cfg, "backend.num_gpus", 0.0)
    if "client_data_cache_mb" in b:
        check_float(cfg, "backend.client_data_cache_mb", 0.0)
    if "batching_group" in b:
        check_int(cfg, "backend.batching_group", 0)
    if b.get("batched_autocast") is not None:
        check_choice(cfg, "backend.batched_autocast", ("none", "bf16"))
        if b["batched_autocast"] == "bf16" and not b.get("client_batching"):
            fail("backend.batched_autocast", "bf16", "bf16 autocast applies to the vectorised cohort step only: "
                 "set backend.client_batching=true with it, or leave backend.batched_autocast=none (float32, the "
                 "default)")
    if b.get("malloc_arena_max") is not None:
        check_int(cfg, "backend.malloc_arena_max", 0)
    device = str(b.get("device", "auto"))
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        fail("backend.device", b.get("device"), "allowed values are auto, cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail("backend.device", device, "this machine has no CUDA device (torch.cuda.is_available() is false); "
                                           "use auto or cpu")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            fail("backend.device", device, f"this machine has {torch.cuda.device_count()} CUDA devices")
    problem = address_problem(b.get("address"))
    if problem:
        fail("backend.address", b["address"], problem)
    init_args = b.get("init_args") or {}
    if not isinstance(init_args, dict):
        fail("backend.init_args", init_args, "expected a mapping of ray.init keyword arguments")
    address = b.get("address") or init_args.get("address")
    if address:
        given = [k for k in ("num_cpus", "num_gpus") if b.get(k) is not None]
        given += [f"init_args.{k}" for k in ("num_cpus", "num_gpus", "resources", "object_store_memory")
                  if k in init_args]
        if given:
            value = get(b, given[0])
            raise ConfigError(
                f"invalid value backend.{given[0]}={value!r} together with backend.address={address!r}: a Ray "
                f"cluster's resources are fixed when it is started (`ray start --num-cpus ... --num-gpus ...`), and "
                f"Ray refuses them when attaching; leave backend.{given[0]} null and set per-client resources with "
                f"backend.num_cpus_per_client / backend.num_gpus_per_client.")
        return
    machine = os.cpu_count() or 1
    if b.get("num_cpus") is not None and int(b["num_cpus"]) > machine:
        fail("backend.num_cpus", b["num_cpus"], f"this machine has {machine} CPUs; Ray would start up to "
             f"{int(b['num_cpus'] / float(b['num_cpus_per_client']))} client actors on them, each holding a model and "
             f"its data (hundreds of MB): use at most {machine}, or null for all")
    cpus = int(b.get("num_cpus") or machine)
    if float(b["num_cpus_per_client"]) > cpus:
        raise ConfigError(
            f"invalid value backend.num_cpus_per_client={b['num_cpus_per_client']!r}: Ray will have {cpus} CPUs "
            f"(backend.num_cpus={b.get('num_cpus')!r}), so no client actor would ever start; use at most {cpus}.")
    if float(b["num_gpus_per_client"]) > 0:
        import torch

        gpus = b.get("num_gpus")
        gpus = float(torch.cuda.device_count() if gpus is None else gpus)
        if gpus < float(b["num_gpus_per_client"]):
            raise ConfigError(
                f"invalid value backend.num_gpus_per_client={b['num_gpus_per_client']!r}: Ray will have {gpus:g} "
                f"GPUs, so no client actor would ever start; use 0 on a machine without a GPU.")


def _reliability(cfg: dict) -> None:
    if "checkpoint" in cfg:
        check_int(cfg, "checkpoint.every", 0)
        check_int(cfg, "checkpoint.keep", 0)
        check_bool(cfg, "checkpoint.on_signal")
    if cfg.get("resume") is not None and not isinstance(cfg["resume"], str):
        fail("resume", cfg["resume"], "expected the path of a run directory")
    fi = cfg.get("fault_injection") or {}
    if fi:
        check_float(cfg, "fault_injection.probability", 0.0, 1.0)
    if "phase" in fi:
        check_choice(cfg, "fault_injection.phase", FAULT_PHASES)
    if "mode" in fi:
        modes = fault_modes(fi)
        if not modes or any(m not in FAULT_MODES for m in modes):
            fail("fault_injection.mode", fi["mode"], f"allowed values are {', '.join(FAULT_MODES)} or a list")
        if modes == ["nan"] and fi.get("phase", "train") != "train":
            fail("fault_injection.phase", fi["phase"], "fault_injection.mode=nan poisons a training update, so the "
                                                       "phase must be train")
    sampled = clients_per_round(cfg["num_clients"], cfg["participation"])
    if int(cfg["backend"]["min_clients_per_round"]) > sampled:
        raise ConfigError(
            f"invalid combination backend.min_clients_per_round={cfg['backend']['min_clients_per_round']} with "
            f"participation={cfg['participation']} and num_clients={cfg['num_clients']}: only {sampled} clients are "
            f"sampled per round, so the global model would never change; lower min_clients_per_round to at most "
            f"{sampled}.")


def _privacy(cfg: dict, server) -> None:
    """Client-level DP (:mod:`fedlt.privacy`): the mode's typed options, and the runs whose uploads it cannot
    protect or whose sampling it cannot account for."""
    if "privacy" not in cfg:  # a run directory written before the privacy group existed: no DP
        return
    check_choice(cfg, "privacy.name", tuple(PRIVACY_MODES))
    name = cfg["privacy"]["name"]
    if "secagg" not in cfg["privacy"]:  # a run directory written before privacy.secagg existed: off
        check_params({"privacy": {**param_defaults(SecAggParams), **cfg["privacy"]}}, "privacy", PRIVACY_MODES[name])
    else:
        check_params(cfg, "privacy", PRIVACY_MODES[name])
    if cfg["privacy"].get("secagg"):
        _secagg(cfg, server)
    if name == NONE:
        return
    combo = f"invalid combination privacy={name} with strategy={cfg['strategy']['name']}"
    client = server.client_cls
    if client.extra_uploads:
        raise ConfigError(
            f"{combo}: its clients upload {client.extra_uploads} besides their model update, and client-level DP "
            f"clips and noises only the model update, so these uploads would leave the clients unprotected (the "
            f"method cannot run without them). Use privacy=none, or a strategy whose clients upload only their model "
            f"update (e.g. fedavg, fedprox, fedlc, fedloge).")
    if client.is_personal(""):  # a personal prefix "" covers every key: nothing is shared
        raise ConfigError(f"{combo}: its clients share no model arrays (the whole model is personal), so there is "
                          f"no update to protect and no epsilon to report; use privacy=none.")
    if server.sample_clients is not ServerAlgorithm.sample_clients:  # server: the strategy's Server class
        raise ConfigError(f"{combo}: the strategy chooses its own clients (sample_clients), while the privacy "
                          f"accountant needs the sampling it assumes (privacy.sampling: poisson or fixed-size "
                          f"uniform); use privacy=none.")
    if cfg["backend"].get("client_batching") and name == DPSGD:  # dp_central/dp_local: clipped per client
        raise ConfigError(
            f"invalid combination privacy={name} with backend.client_batching=true: DP-SGD clips and noises every "
            f"sample's gradient, and the vectorised cohort trainer computes no per-sample gradients; set "
            f"backend.client_batching=false (dp_central and dp_local work with client batching).")
    if name == CENTRAL:
        _central_dp(cfg)
    elif name == DPSGD:
        _dp_sgd(cfg, server)


def _secagg(cfg: dict, server) -> None:
    """Secure aggregation (:mod:`fedlt.privacy.secagg`): the server learns only the sample-weighted mean of the
    clients' model arrays, so the strategy must need nothing else from a round (``secagg_ready``, declared in its
    own ``Server`` class), and every round needs at least 2 clients whose sum fits the modulus."""
    from fedlt.privacy.secagg import MODULUS

    p = cfg["privacy"]
    combo = "invalid combination privacy.secagg=true with"
    client = server.client_cls
    ready = ("fedavg, fedprox, fedavgm, fedadam, fedbabu, fedbn, fedetf, fedlc, fedloge, fedper, fedrep, fedrod, "
             "ditto, moon")
    why = ""
    if not vars(server).get("secagg_ready", False):
        why = (f"strategy={cfg['strategy']['name']}: its server needs more than the sample-weighted mean of the "
               f"clients' model arrays (individual replies, extra uploads, its own client choice, or no shared "
               f"arrays), and secure aggregation reveals only that mean. It runs with strategies whose aggregate "
               f"is that mean: {ready}; use one of those")
    elif client.extra_uploads or client.uses_eval_uploads():
        why = (f"strategy={cfg['strategy']['name']}: its clients upload "
               f"{client.extra_uploads or 'eval_uploads statistics'} besides the model arrays, which the secure sum "
               f"does not cover; use one of {ready}")
    elif cfg["backend"].get("client_batching"):
        why = ("backend.client_batching=true: a cohort reply is already an average, not one client's masked "
               "update; set backend.client_batching=false")
    elif p.get("batchnorm_stats", "clip") == "unprotected":
        why = ("privacy.batchnorm_stats=unprotected: it averages BatchNorm statistics in the clear, outside the "
               "secure sum; use privacy.batchnorm_stats=clip")
    if why:
        raise ConfigError(f"{combo} {why}, or privacy.secagg=false.")
    m = clients_per_round(int(cfg["num_clients"]), cfg["participation"])
    if m < 2:
        raise ConfigError(
            f"{combo} num_clients={cfg['num_clients']} and participation={cfg['participation']}: {m} client per "
            f"round, and a secure sum of one client is that client's update; sample at least 2 clients per round.")
    if m * int(p["secagg_quantization_range"]) >= MODULUS:
        raise ConfigError(
            f"{combo} privacy.secagg_quantization_range={p['secagg_quantization_range']} and {m} clients per round: "
            f"their quantized sum would overflow the modulus 2^32; use a quantization range below "
            f"{MODULUS // m} (e.g. {2 ** ((MODULUS // m - 1).bit_length() - 1)}).")


# losses that are a mean of per-sample terms and read nothing of the client's data but the sample itself
DP_SGD_LOSSES = ("ce", "focal", "gce", "sce")


def _dp_sgd(cfg: dict, server) -> None:
    """Sample-level DP-SGD (:mod:`fedlt.privacy.dp_sgd`): per-sample gradients must exist (no BatchNorm), the loss
    must be per-sample and not read the client's class counts, batches must be the Poisson ones the accountant
    assumes, and the algorithm's whole local update must be the DP-SGD loop."""
    from fedlt.api.client import ClientAlgorithm
    from fedlt.models import norm_name

    strategy = cfg["strategy"]["name"]
    norm = norm_name(cfg["model"])
    if norm != "group":
        raise ConfigError(
            f"invalid combination privacy=dp_sgd with model.norm={norm}: DP-SGD clips every sample's own gradient, "
            f"and BatchNorm has none (it normalises each sample with its batch's statistics, so one sample's "
            f"gradient depends on the others, and its running statistics are computed from the data without "
            f"noise). Add model.norm=group (GroupNorm, which normalises every sample on its own).")
    loss = (cfg.get("loss") or {}).get("name", "ce")
    if loss not in DP_SGD_LOSSES:
        raise ConfigError(
            f"invalid combination privacy=dp_sgd with loss={loss}: DP-SGD needs a loss that is a mean of per-sample "
            f"terms reading nothing but the sample, and {loss} reads the client's per-class training counts (or, "
            f"ldam_drw, re-weights by the batch's total weight), so one sample changes every other sample's loss, "
            f"which per-sample clipping does not cover; use one of {', '.join(DP_SGD_LOSSES)}.")
    sampler = (cfg.get("sampler") or {}).get("name", "uniform")
    if sampler != "uniform":
        raise ConfigError(
            f"invalid combination privacy=dp_sgd with sampler={sampler}: DP-SGD draws its own Poisson batches (every "
            f"sample independently with probability 1/ceil(n_k/batch_size)), which is what the accountant assumes; "
            f"a re-sampler would change that. Use sampler=uniform.")
    client = server.client_cls

    def owner(attr: str) -> type:
        return next(c for c in client.__mro__ if attr in vars(c))

    trainer = owner("train")
    why = ""
    if not vars(trainer).get("dp_sgd_ready", False):
        why = (f"its local update ({trainer.__name__}.train) is not a single ClientAlgorithm.local_epochs call (extra "
               f"heads, losses or passes over the data), so some of its training would not be DP-SGD")
    elif owner("loss_fn") is not ClientAlgorithm:
        why = (f"it replaces the client loss ({owner('loss_fn').__name__}.loss_fn), which DP-SGD cannot check is "
               f"a per-sample loss (a loss built on the client's class counts lets one sample change every "
               f"sample's loss)")
    elif owner("local_epochs") is not ClientAlgorithm:
        why = f"it replaces the local loop itself ({owner('local_epochs').__name__}.local_epochs)"
    if why:
        raise ConfigError(
            f"invalid combination privacy=dp_sgd with strategy={strategy}: {why}. DP-SGD runs with strategies "
            f"whose clients train with one plain local_epochs call, e.g. fedavg, fedprox, fedavgm, fedadam, fedper, "
            f"fedbabu; "
            f"use one of those, or client-level DP (privacy=dp_central or dp_local).")


def _central_dp(cfg: dict) -> None:
    from fedlt.privacy import accounting

    p = cfg["privacy"]
    if int(cfg["backend"]["min_clients_per_round"]) != 1:
        raise ConfigError(
            f"invalid combination privacy=dp_central with backend.min_clients_per_round="
            f"{cfg['backend']['min_clients_per_round']}: the noised aggregate is released every round (skipping a "
            f"round because few clients answered would reveal who took part), so min_clients_per_round must be 1.")
    if p["accountant"] == "pld" and p["sampling"] != accounting.POISSON:
        fail("privacy.accountant", p["accountant"], "the PLD accountant covers Poisson sampling only; with "
             "privacy.sampling=fixed use privacy.accountant=rdp")
    n = int(cfg["num_clients"])
    m = clients_per_round(n, cfg["participation"])
    q = float(cfg["participation"]) if p["sampling"] == accounting.POISSON else m / n
    expected = q * n if p["sampling"] == accounting.POISSON else m
    target = p["target_epsilon"]
    calibrate = target is not None and p["on_budget"] == "calibrate"
    z = float(p["noise_multiplier"])
    if target is not None and not calibrate:
        if z <= 0:
            fail("privacy.noise_multiplier", p["noise_multiplier"], "with privacy.target_epsilon and "
                 "on_budget=stop the noise multiplier must be > 0 (without noise epsilon is infinite)")
        first = accounting.central_epsilon(z, 1, float(p["delta"]), p["sampling"], n, m, q, p["accountant"])
        if first > float(target):
            raise ConfigError(
                f"invalid value privacy.target_epsilon={target}: one round with noise_multiplier={z:g} already "
                f"spends epsilon {first:.3g} (delta {p['delta']}), so no round could run; raise the target or the "
                f"noise multiplier, or use on_budget=calibrate.")
    if p["adaptive_clipping"]:
        stddev = float(p["clipped_count_stddev"]) if p["clipped_count_stddev"] is not None else expected / 20
        if calibrate:  # the z the run will use (deterministic: the run computes the same value)
            z = accounting.calibrate_noise(float(target), int(cfg["num_rounds"]), float(p["delta"]), p["sampling"],
                                           n, m, q, p["accountant"])
        if z >= 2 * stddev:
            raise ConfigError(
                f"invalid combination privacy.adaptive_clipping=true with noise multiplier {z:.4g}"
                f"{' (calibrated for target_epsilon)' if calibrate else ''} and clipped_count_stddev {stddev:.4g}"
                f"{' (expected clients per round / 20)' if p['clipped_count_stddev'] is None else ''}: the count of "
                f"unclipped updates needs its own share of the noise, which requires noise multiplier < 2 x "
                f"clipped_count_stddev (Andrew et al. 2021); set privacy.clipped_count_stddev above {z / 2:.4g}, "
                f"sample more clients per round, or use fixed clipping.")
