"""``fedlt-attack RUN_DIR``: membership inference on a finished (or stopped) run's models, written to
``RUN_DIR/attack.json``.

Which models: the global model of the newest checkpoint in ``RUN_DIR/checkpoints`` (the strategy's primary
generic predictor, built as the round loop builds it for generic evaluation), and, where the checkpoint holds
personal state for clients (personal arrays or the algorithm's per-client tensors), each such client's primary
personalized predictor (``ClientAlgorithm.predictors``, built as the client step builds it). Clients never
sampled have no personal state and predict with the global model; they are not attacked as personal models.

Members and non-members (same distribution, class by class):

* global model: members are the clients' training images (with the labels they trained on: the noisy ones under
  ``dataset.label_noise``); non-members are images nobody trained on, drawn class by class in the same numbers
  as the members, so both sides follow the long-tailed training class profile. They come first from the source
  training split outside every client's training set and the server-held set (the images the long-tail profile
  left out, and held-out local tests), and, for a class with too few of those (a head class the profile keeps
  whole), from the source test split of that class. attack.json says how many came from each. The balanced test
  set as it is would NOT do: it has another class profile, and the attack would partly measure the class.
* personal model of client k: members are client k's training images; non-members the same number per class
  drawn from that pool.

The members are subsampled (``--max-members``, ``--max-members-per-client``) keeping the class profile; every
class keeps at least one member when it has a non-member to match. Scoring and metrics:
:mod:`fedlt.privacy.attacks`. Head/mid/tail: :func:`fedlt.eval.groups.shot_groups` of the clients' training
counts, under every shot rule (personal models too: the global groups). Nothing in RUN_DIR but attack.json is
written (the data split cache may be drawn again under ``cache_dir``, as any run does); an existing attack.json
is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ATTACK_FILE = "attack.json"


class AttackError(ValueError):
    """A user error (not a run folder, no checkpoint, attack.json present): one paragraph, exit code 2."""


# ---------------------------------------------------------------------------------- member sampling
def pools(split, source) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(member labels by class of the source training split's clean labels, per class the non-member training
    indices, per class the test indices)."""
    train_y = np.asarray(source.train_y, dtype=np.int64)
    test_y = np.asarray(source.test_y, dtype=np.int64)
    used = np.zeros(len(train_y), dtype=bool)
    for idx in split.client_train:
        used[np.asarray(idx, dtype=np.int64)] = True
    used[np.asarray(split.server_indices, dtype=np.int64)] = True
    k = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
    outside = np.flatnonzero(~used)
    train_pool = {c: outside[train_y[outside] == c] for c in range(k)}
    test_pool = {c: np.flatnonzero(test_y == c) for c in range(k)}
    return train_y, train_pool, test_pool


def matched_sample(member_idx: np.ndarray, member_class: np.ndarray, train_pool: dict, test_pool: dict,
                   budget: int, rng: np.random.Generator) -> dict:
    """Members (positions into ``member_idx``) subsampled to at most ``budget`` keeping the class profile, and
    as many non-members per class: first from ``train_pool`` (source training indices), then ``test_pool``."""
    classes, counts = np.unique(member_class, return_counts=True)
    f = min(1.0, budget / max(len(member_idx), 1))
    pos, non_train, non_test, non_class_train, non_class_test = [], [], [], [], []
    for c, n in zip(classes.tolist(), counts.tolist(), strict=True):
        want = min(n, max(1, int(round(f * n))))
        tr, te = train_pool.get(c, np.zeros(0, np.int64)), test_pool.get(c, np.zeros(0, np.int64))
        take = min(want, len(tr) + len(te))
        if take == 0:
            continue
        pos.append(rng.choice(np.flatnonzero(member_class == c), take, replace=False))
        from_train = min(take, len(tr))
        non_train.append(rng.choice(tr, from_train, replace=False))
        non_test.append(rng.choice(te, take - from_train, replace=False))
        non_class_train += [c] * from_train
        non_class_test += [c] * (take - from_train)
    cat = (lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64))
    return {"members": cat(pos), "non_train": cat(non_train), "non_test": cat(non_test),
            "non_class": np.array(non_class_train + non_class_test, dtype=np.int64)}


# ----------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score(predictor, x_uint8: np.ndarray, labels: np.ndarray, plan, batch_size: int, device: str) -> dict:
    from fedlt.data.augment import to_float
    from fedlt.eval.predict import predict_logits
    from fedlt.privacy.attacks import example_scores

    if len(labels) == 0:
        return {"loss": np.zeros(0), "confidence": np.zeros(0)}
    x = to_float(torch.from_numpy(np.ascontiguousarray(x_uint8)), plan.mean, plan.std)
    logits = predict_logits(predictor, x, batch_size, device)
    return example_scores(logits, torch.from_numpy(labels))


def side_scores(predictor, source, member_idx, member_labels, member_class, draw, plan, batch_size, device):
    """(member scores, member classes, non-member scores, non-member classes) of one model."""
    pos = draw["members"]
    m = score(predictor, np.asarray(source.train_x[member_idx[pos]]), member_labels[pos], plan, batch_size, device)
    nx = np.concatenate([np.asarray(source.train_x[draw["non_train"]]), np.asarray(source.test_x[draw["non_test"]])])
    ny = draw["non_class"]
    nm = score(predictor, nx, ny, plan, batch_size, device)
    return m, member_class[pos], nm, ny


# ------------------------------------------------------------------------------------------ the run
def check_run_dir(run_dir: Path) -> list:
    """(round, path) of the run folder's checkpoints; AttackError when it is not a run folder or has none."""
    from fedlt.core import checkpoint

    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is not a folder"
        raise AttackError(f"{run_dir} {what}; fedlt-attack takes a run folder (the folder a fedlt run wrote, "
                          f"with its checkpoints/ subfolder), e.g. fedlt-attack runs/2026-12-01/12-00-00.")
    found = checkpoint.list_checkpoints(run_dir)
    if not found:
        raise AttackError(
            f"{run_dir} has no checkpoint ({checkpoint.checkpoint_dir(run_dir)}/round-NNNNNN.pt); the attack needs "
            f"the trained model, which only a checkpoint holds. Run with checkpoint.every>0 (the default saves "
            f"every 5 rounds and after the last one), or pass the folder of a run that saved one.")
    return found


def newest_checkpoint(run_dir: Path):
    from fedlt.core import checkpoint

    rnd, path = check_run_dir(run_dir)[-1]
    state, cfg, _ = checkpoint.load(path)  # CheckpointError: one paragraph
    return rnd, path, state, cfg


def attack_run(run_dir: Path, max_members: int = 2000, max_members_per_client: int = 500, seed: int = 0,
               batch_size: int = 512, device: str = "cpu", personal: bool = True) -> dict:
    """The whole attack on one run folder; returns what attack.json holds (writes nothing)."""
    from fedlt.api.client import ClientContext
    from fedlt.core.client_state import PERSONAL, STATE
    from fedlt.core.client_step import with_sampler
    from fedlt.core.model import build_run_model
    from fedlt.data.federated import client_data, prepare, server_data
    from fedlt.eval.groups import SHOT_RULES, shot_groups
    from fedlt.privacy.attacks import evaluate
    from fedlt.seeding import EVAL, INIT, derive_seed, numpy_rng, torch_generator
    from strategies import get_strategy

    t0 = time.monotonic()
    rnd, path, state, cfg = newest_checkpoint(run_dir)
    plan, split, source = prepare(cfg)
    try:
        server_cls = get_strategy(cfg["strategy"]["name"])
    except KeyError as e:
        raise AttackError(f"the checkpoint {path} was written by {e.args[0]}; this fedlt cannot rebuild its "
                          f"model.") from None
    k = plan.num_classes
    train_y, train_pool, test_pool = pools(split, source)
    member_idx = np.concatenate([np.asarray(t, dtype=np.int64) for t in split.client_train])
    counts = np.bincount(train_y[member_idx], minlength=k)  # the clients' training counts (true classes)
    groups = {rule: shot_groups(counts, rule) for rule in SHOT_RULES}

    def trained_labels(cid: int) -> np.ndarray:
        if split.noisy_labels is not None:
            return np.asarray(split.noisy_labels[cid], dtype=np.int64)
        return train_y[np.asarray(split.client_train[cid], dtype=np.int64)]

    # the global model, as the round loop builds it for generic evaluation
    run_seed = int(cfg["seed"])
    torch.manual_seed(derive_seed(run_seed, INIT))
    model = build_run_model(cfg, plan, server_cls.client_cls)
    init_state = {n: v.detach().clone() for n, v in model.state_dict().items()}
    strategy = server_cls(cfg)
    strategy.server_data = server_data(plan)
    strategy.initial_arrays(model)
    strategy.load_server_state(state.server_state)
    model.load_state_dict(state.arrays, strict=False)
    if strategy.frozen:
        model.load_state_dict(strategy.frozen, strict=False)
    model.to(device)
    gname, gpred = next(iter(strategy.generic_predictors(model).items()))

    member_labels = np.concatenate([trained_labels(c) for c in range(len(split.client_train))])
    member_class = train_y[member_idx]
    draw = matched_sample(member_idx, member_class, train_pool, test_pool, max_members, numpy_rng(seed, 0))
    m, mc, nm, nc = side_scores(gpred, source, member_idx, member_labels, member_class, draw, plan, batch_size,
                                device)
    glob = evaluate(m, nm, mc, nc, k, groups)
    glob.update(predictor=gname, non_members_from={"train_outside_clients": len(draw["non_train"]),
                                                   "test": len(draw["non_test"])})

    out: dict = {
        "run_dir": str(run_dir), "checkpoint": path.name, "round": rnd, "strategy": cfg["strategy"]["name"],
        "dataset": cfg["dataset"].get("name"), "privacy": (cfg.get("privacy") or {}).get("name", "none"),
        "attacks": {"loss": "Yeom et al. 2018: score = -cross-entropy with the trained-on label",
                    "confidence": "Salem et al. 2019 (ML-Leaks, threshold adversary): score = max softmax"},
        "advantage": "max over thresholds of TPR - FPR, threshold chosen on these examples (optimistic)",
        "non_members": "never trained on by any client or the server, drawn per class in the members' numbers: "
                       "source training images outside the clients' sets first, then the test split",
        "groups": groups, "seed": seed, "max_members": max_members,
        "global": glob,
    }

    holders = sorted(int(c) for c, recs in state.clients.items() if recs)
    if not personal or not holders:
        out["personal"] = None
        out["personal_note"] = ("not requested (--no-personal)" if not personal else
                                "the checkpoint holds no per-client state: every client predicts with the global "
                                "model")
    else:
        algo = server_cls.client_cls(cfg)
        cm, cmc, cnm, cnc, per_client = [], [], [], [], {}
        for cid in holders:
            recs = state.clients[cid] if cid in state.clients else state.clients[str(cid)]
            model.load_state_dict(init_state)
            for sd in ((strategy.frozen or {}), state.arrays, recs.get(PERSONAL, {})):
                model.load_state_dict(sd, strict=False)
            ctx = ClientContext(model=model, data=with_sampler(client_data(plan, cid), cfg, rnd), cfg=cfg,
                                round=rnd, generator=torch_generator(run_seed, EVAL, rnd, cid),
                                state=dict(recs.get(STATE, {})), device=device)
            torch.manual_seed(derive_seed(run_seed, EVAL, rnd, cid))
            pname, pred = next(iter(algo.predictors(ctx).items()))
            idx = np.asarray(split.client_train[cid], dtype=np.int64)
            cdraw = matched_sample(idx, train_y[idx], train_pool, test_pool, max_members_per_client,
                                   numpy_rng(seed, 1, cid))
            a, ac, b, bc = side_scores(pred, source, idx, trained_labels(cid), train_y[idx], cdraw, plan,
                                       batch_size, device)
            cm.append(a), cmc.append(ac), cnm.append(b), cnc.append(bc)
            per_client[cid] = evaluate(a, b, ac, bc, k, {})
        cat = (lambda xs, key=None: np.concatenate([x[key] for x in xs] if key else xs))
        pooled = evaluate({n: cat(cm, n) for n in ("loss", "confidence")},
                          {n: cat(cnm, n) for n in ("loss", "confidence")}, cat(cmc), cat(cnc), k, groups)
        pooled.update(predictor=pname, clients=holders, max_members_per_client=max_members_per_client,
                      pooled="scores of all attacked clients' personal models ranked together")
        for n in ("loss", "confidence"):
            vals = [per_client[c][n]["auc"] for c in holders]
            pooled[n]["per_client_auc"] = vals
            pooled[n]["mean_client_auc"] = float(np.nanmean(vals)) if np.any(np.isfinite(vals)) else float("nan")
            pooled[n]["mean_client_advantage"] = float(np.nanmean([per_client[c][n]["advantage"] for c in holders]))
        out["personal"] = pooled
    out["time_s"] = time.monotonic() - t0
    return out


# ------------------------------------------------------------------------------------------ output
def _f(v, spec=".3f") -> str:
    return "  n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def summary(res: dict) -> str:
    lines = [f"membership inference on {res['run_dir']} ({res['checkpoint']}, strategy {res['strategy']}, "
             f"privacy {res['privacy']})"]
    for label, key in (("global model", "global"), ("personal models", "personal")):
        r = res.get(key)
        if not r:
            if key == "personal":
                lines.append(f"personal models: none ({res.get('personal_note', '')})")
            continue
        extra = f", {len(r['clients'])} clients pooled" if key == "personal" else ""
        lines.append(f"{label} [{r['predictor']}]: {r['n_members']} members vs {r['n_non_members']} non-members"
                     f"{extra} (AUC of a blind attack: 0.5 +- {_f(r['auc_null_std'])})")
        rule = "cumulative_75_95"
        lines.append(f"  {'attack':<11} {'AUC':>6} {'adv':>6}   {'head':>6} {'mid':>6} {'tail':>6}  ({rule})")
        for n in ("loss", "confidence"):
            g = r[n]["groups"].get(rule, {})
            more = f"  Yeom adv {_f(r[n]['yeom_advantage'])}" if n == "loss" else ""
            more += f"  mean client AUC {_f(r[n]['mean_client_auc'])}" if key == "personal" else ""
            lines.append(f"  {n:<11} {_f(r[n]['auc']):>6} {_f(r[n]['advantage']):>6}   {_f(g.get('head')):>6} "
                         f"{_f(g.get('mid')):>6} {_f(g.get('tail')):>6}{more}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from fedlt.core.checkpoint import CheckpointError
    from fedlt.data.sources import DataError
    from fedlt.runlog import json_safe, write_json_atomic

    p = argparse.ArgumentParser(prog="fedlt-attack", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a fedlt run folder (with checkpoints/)")
    p.add_argument("--force", action="store_true", help=f"overwrite an existing {ATTACK_FILE}")
    p.add_argument("--max-members", type=int, default=2000, help="members attacked on the global model (default 2000)")
    p.add_argument("--max-members-per-client", type=int, default=500,
                   help="members attacked per personal model (default 500)")
    p.add_argument("--no-personal", action="store_true", help="attack the global model only")
    p.add_argument("--seed", type=int, default=0, help="seed of the member / non-member draw (default 0)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = p.parse_args(argv)
    try:
        for name, v in (("--max-members", args.max_members), ("--max-members-per-client", args.max_members_per_client),
                        ("--batch-size", args.batch_size)):
            if v < 1:
                raise AttackError(f"{name}={v} is not allowed; it must be a positive integer.")
        out = args.run_dir / ATTACK_FILE
        if args.run_dir.is_dir() and out.exists() and not args.force:
            raise AttackError(f"{out} already exists; refusing to overwrite it. Pass --force to replace it, or "
                              f"move it away first.")
        check_run_dir(args.run_dir)  # bad input is refused before the data is opened
        res = attack_run(args.run_dir, args.max_members, args.max_members_per_client, args.seed, args.batch_size,
                         args.device, not args.no_personal)
    except (AttackError, CheckpointError, DataError) as e:
        print(f"fedlt-attack: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    write_json_atomic(out, json_safe(res))
    print(summary(json_safe(res)))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
