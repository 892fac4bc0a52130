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
written (and ``attack_inversion.png`` with ``--inversion-png``; the data split cache may be drawn again under
``cache_dir``, as any run does); an existing attack.json (or PNG) is kept unless ``--force``.

``--inversion`` adds gradient inversion (DLG, Zhu et al. 2019; iDLG, Zhao et al. 2020;
:mod:`fedlt.privacy.inversion`): client ``--inversion-client``'s update of one local SGD step on
``--inversion-images`` of its training images (drawn with ``--seed``) at the checkpoint's global model is
inverted, as sent without DP and, for a DP run, as the run's privacy mode protects it; attack.json's
"inversion" section holds per case PSNR, SSIM, label accuracy and the final gradient distance.
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


def strategy_of(cfg: dict, path: Path):
    """The run's server class; AttackError when this fedlt does not know the strategy."""
    from strategies import get_strategy

    try:
        return get_strategy(cfg["strategy"]["name"])
    except KeyError as e:
        raise AttackError(f"the checkpoint {path} was written by {e.args[0]}; this fedlt cannot rebuild its "
                          f"model.") from None


def global_model(cfg: dict, state, plan, server_cls, device: str):
    """(model, strategy, initial state dict): the checkpoint's global model, built as the round loop builds it
    for generic evaluation (seeded init, the strategy's server state, global then frozen arrays)."""
    from fedlt.core.model import build_run_model
    from fedlt.data.federated import server_data
    from fedlt.seeding import INIT, derive_seed

    torch.manual_seed(derive_seed(int(cfg["seed"]), INIT))
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
    return model, strategy, init_state


def attack_run(run_dir: Path, max_members: int = 2000, max_members_per_client: int = 500, seed: int = 0,
               batch_size: int = 512, device: str = "cpu", personal: bool = True) -> dict:
    """The whole attack on one run folder; returns what attack.json holds (writes nothing)."""
    from fedlt.api.client import ClientContext
    from fedlt.core.client_state import PERSONAL, STATE
    from fedlt.core.client_step import with_sampler
    from fedlt.data.federated import client_data, prepare
    from fedlt.eval.groups import SHOT_RULES, shot_groups
    from fedlt.privacy.attacks import evaluate
    from fedlt.seeding import EVAL, derive_seed, numpy_rng, torch_generator

    t0 = time.monotonic()
    rnd, path, state, cfg = newest_checkpoint(run_dir)
    plan, split, source = prepare(cfg)
    server_cls = strategy_of(cfg, path)
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
    model, strategy, init_state = global_model(cfg, state, plan, server_cls, device)
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


# ------------------------------------------------------------------------------------------ inversion
INVERSION_PNG = "attack_inversion.png"
THREAT_MODEL = ("an honest-but-curious server inverts one client's update of ONE local SGD step (FedSGD) on B of "
                "its training images, computed on the checkpoint's global model; it knows the model, the "
                "learning rate and the privacy settings (fedlt.privacy.inversion)")


def check_inversion_args(client: int, images: int, iters: int) -> None:
    from fedlt.privacy.inversion import MAX_IMAGES

    if client < 0:
        raise AttackError(f"--inversion-client={client} is not allowed; it must be a client index, 0 to "
                          f"num_clients - 1.")
    if not 1 <= images <= MAX_IMAGES:
        raise AttackError(f"--inversion-images={images} is not allowed; the batch to reconstruct holds 1 to "
                          f"{MAX_IMAGES} images (DLG/iDLG invert small batches; iDLG's label rule is exact for 1).")
    if iters < 1:
        raise AttackError(f"--inversion-iters={iters} is not allowed; it must be a positive number of L-BFGS "
                          f"steps (the papers' 300 is the default).")


def inversion_run(run_dir: Path, client: int = 0, images: int = 1, method: str = "idlg", iters: int = 300,
                  seed: int = 0, device: str = "cpu") -> dict:
    """Gradient inversion (DLG / iDLG, :mod:`fedlt.privacy.inversion`) of client ``client``'s one-step update on
    ``images`` of its training images (drawn with ``seed``), without DP and, for a DP run, with the run's
    protection. Returns attack.json's "inversion" section; the original and reconstructed images (de-normalised)
    are under the private key "_grids" (for :func:`save_inversion_grid`; not written to JSON)."""
    from fedlt.data.federated import client_data, prepare
    from fedlt.privacy import enabled, mode
    from fedlt.privacy.inversion import OFFICIAL_ITERS, attacked_parameters, invert
    from fedlt.seeding import derive_seed, numpy_rng

    t0 = time.monotonic()
    rnd, path, state, cfg = newest_checkpoint(run_dir)
    n_clients = int(cfg["num_clients"])
    if not 0 <= client < n_clients:
        raise AttackError(f"--inversion-client={client} is not allowed; this run has {n_clients} clients "
                          f"(0 to {n_clients - 1}).")
    plan, split, _ = prepare(cfg)
    data = client_data(plan, client)
    n = data.num_train
    if images > n:
        raise AttackError(f"--inversion-images={images} is not allowed for client {client}, which has only {n} "
                          f"training images; pass at most {n}.")
    server_cls = strategy_of(cfg, path)
    model, _, _ = global_model(cfg, state, plan, server_cls, device)
    model.eval()
    names = [name for name, _ in attacked_parameters(model, server_cls.client_cls.is_shared)]
    idx = np.sort(numpy_rng(seed, 2, client).choice(n, images, replace=False))
    x = data.normalise(data.train_x[torch.from_numpy(idx)]).to(device)
    y = data.train_y[torch.from_numpy(idx)].to(device)
    out: dict = {
        "client": client, "client_image_indices": idx.tolist(), "images": images, "method": method,
        "iterations": iters, "official_iterations": OFFICIAL_ITERS, "seed": seed, "threat_model": THREAT_MODEL,
        "attacked_parameters": len(names),
        "batchnorm": "gradients in eval mode: BatchNorm normalises with the checkpoint's running statistics (one "
                     "image's gradient does not depend on the others; fedlt's real client trains in train mode)",
        "metrics": "per image; PSNR and SSIM on de-normalised images clipped to [0, 1], data range 1; SSIM: "
                   "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid filtering, torch conv2d (scikit-image "
                   "is not installed); B > 1: reconstructions paired with originals by max summed PSNR; "
                   "label_accuracy: multiset overlap / B; gradient_distance: the final L2 gradient distance",
        "cases": {},
    }
    if (cfg.get("privacy") or {}).get("secagg"):
        out["secagg_note"] = ("the run used secure aggregation: the server sees only the sum of the round's "
                              "updates, never this client's update; the numbers show what it would leak without")
    grids = {}
    run_mode = mode(cfg)
    for case in ["none"] + ([run_mode] if enabled(cfg) else []):
        res = invert(model, names, x, y, plan.num_classes, plan.mean, plan.std, cfg if case != "none" else None,
                     method, iters, derive_seed(seed, 3, client), rnd + 1, client, n,
                     (state.privacy or {}).get("clip"))  # C of the next round (adaptive clipping moves it)
        grids["original"] = res.pop("_original")
        grids[case] = res.pop("_reconstruction")
        out["cases"][case] = res
    out["time_s"] = time.monotonic() - t0
    out["_grids"] = grids
    return out


def save_inversion_grid(inv: dict, path: Path) -> None:
    """PNG: the original images (top row) and each case's reconstructions, PSNR / SSIM under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = inv["_grids"]
    rows = ["original", *inv["cases"]]
    b = grids["original"].shape[0]
    fig, axes = plt.subplots(len(rows), b, figsize=(1.9 * b + 0.6, 2.1 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        for i in range(b):
            ax = axes[r][i]
            img = grids[name][i].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0.0, vmax=1.0)
            ax.set_xticks([]), ax.set_yticks([])
            if name == "original":
                ax.set_title(f"label {inv['cases']['none']['true_labels'][i]}", fontsize=8)
            else:
                c = inv["cases"][name]
                ax.set_title(f"{_f(c['psnr'][i], '.1f')} dB / {_f(c['ssim'][i], '.2f')}", fontsize=8)
            if i == 0:
                ax.set_ylabel(name if name == "original" else f"{inv['method']} {name}", fontsize=8)
    fig.suptitle(f"inversion, client {inv['client']}\n{inv['iterations']} L-BFGS steps", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def inversion_summary(inv: dict) -> str:
    lines = [f"gradient inversion ({inv['method']}, client {inv['client']}, {inv['images']} image(s), "
             f"{inv['iterations']} L-BFGS steps; PSNR / SSIM on [0, 1] images)"]
    for name, c in inv["cases"].items():
        lines.append(f"  {name:<10} PSNR {_f(c['mean_psnr'], '6.2f')} dB  SSIM {_f(c['mean_ssim'])}  labels "
                     f"{_f(c['label_accuracy'], '.2f')}  gradient distance {c['gradient_distance']:.3g}  "
                     f"({c['steps']} steps, {c['time_s']:.0f} s)")
    return "\n".join(lines)


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
    g = p.add_argument_group("gradient inversion (DLG / iDLG; adds an \"inversion\" section)")
    g.add_argument("--inversion", action="store_true",
                   help="also reconstruct one client's training images from its one-step update, without DP and "
                        "(for a DP run) with the run's protection")
    g.add_argument("--inversion-client", type=int, default=None, help="the client attacked (default 0)")
    g.add_argument("--inversion-images", type=int, default=None, help="its batch size B, 1 to 8 (default 1)")
    g.add_argument("--inversion-method", choices=("dlg", "idlg"), default=None,
                   help="dlg: images and soft labels optimised; idlg: label read from the last layer's gradient "
                        "(default idlg)")
    g.add_argument("--inversion-iters", type=int, default=None,
                   help="L-BFGS steps (default 300, the papers'; lower it on a CPU)")
    g.add_argument("--inversion-png", action="store_true",
                   help=f"also save originals vs reconstructions as RUN_DIR/{INVERSION_PNG}")
    args = p.parse_args(argv)
    inv_opts = {"--inversion-client": args.inversion_client, "--inversion-images": args.inversion_images,
                "--inversion-method": args.inversion_method, "--inversion-iters": args.inversion_iters,
                "--inversion-png": args.inversion_png or None}
    try:
        for name, v in (("--max-members", args.max_members), ("--max-members-per-client", args.max_members_per_client),
                        ("--batch-size", args.batch_size)):
            if v < 1:
                raise AttackError(f"{name}={v} is not allowed; it must be a positive integer.")
        given = [k for k, v in inv_opts.items() if v is not None]
        if given and not args.inversion:
            raise AttackError(f"{', '.join(given)} only apply to the gradient-inversion attack; add --inversion "
                              f"(or drop them).")
        inv_args = {"client": 0 if args.inversion_client is None else args.inversion_client,
                    "images": 1 if args.inversion_images is None else args.inversion_images,
                    "method": args.inversion_method or "idlg",
                    "iters": 300 if args.inversion_iters is None else args.inversion_iters}
        if args.inversion:
            check_inversion_args(inv_args["client"], inv_args["images"], inv_args["iters"])
        out = args.run_dir / ATTACK_FILE
        png = args.run_dir / INVERSION_PNG
        for f in (out, png) if args.inversion_png else (out,):
            if args.run_dir.is_dir() and f.exists() and not args.force:
                raise AttackError(f"{f} already exists; refusing to overwrite it. Pass --force to replace it, or "
                                  f"move it away first.")
        check_run_dir(args.run_dir)  # bad input is refused before the data is opened
        inv = (inversion_run(args.run_dir, seed=args.seed, device=args.device, **inv_args) if args.inversion
               else None)  # first: its client / batch checks need the run's data, and it is the longer part
        res = attack_run(args.run_dir, args.max_members, args.max_members_per_client, args.seed, args.batch_size,
                         args.device, not args.no_personal)
    except (AttackError, CheckpointError, DataError) as e:
        print(f"fedlt-attack: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if inv is not None:
        if args.inversion_png:
            save_inversion_grid(inv, png)
        res["inversion"] = {k: v for k, v in inv.items() if k != "_grids"}
    write_json_atomic(out, json_safe(res))
    print(summary(json_safe(res)))
    if inv is not None:
        print(inversion_summary(res["inversion"]))
        if args.inversion_png:
            print(f"written: {png}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
