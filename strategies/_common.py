"""Small pieces several strategy files share (not a strategy: names starting with _ are not discovered)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from fedlt.api.server import NUM_EXAMPLES
from fedlt.config import ConfigError
from fedlt.models import head_name


def require_ce(cfg: dict, why: str) -> None:
    """Strategies defined by their own client loss refuse ``loss=`` other than ce instead of ignoring it."""
    name = (cfg.get("loss") or {}).get("name", "ce")
    if name != "ce":
        raise ConfigError(f"invalid value loss={name} for strategy={cfg['strategy']['name']}: {why}, so its loss "
                          f"is not selectable; leave loss=ce (the default).")


def require_linear_head(cfg: dict, why: str) -> None:
    """Strategies that replace the configured head, or need a linear one (weight and bias), refuse
    ``model.head`` other than linear instead of ignoring it or failing inside a client."""
    head = head_name(cfg.get("model"))
    if head != "linear":
        raise ConfigError(f"invalid combination strategy={cfg['strategy']['name']} with model.head={head}: {why}, so "
                          f"model.head is not selectable; leave model.head=linear (the default).")


# ------------------------------------------------------------------------- replies (SCAFFOLD, FedDyn, FedProto)
def pop_uploads(replies, prefix: str) -> list[dict]:
    """Remove the arrays whose key starts with ``prefix`` (a strategy's ``ctx.uploads``) from every reply, so that
    averaging sees only model arrays; return them per reply (in reply order) as {key without prefix: tensor}."""
    out = []
    for r in replies:
        rec = r.content["arrays"]
        keys = [k for k in rec.keys() if k.startswith(prefix)]
        out.append({k[len(prefix):]: torch.from_numpy(np.array(rec[k].numpy())) for k in keys})
        for k in keys:
            del rec[k]
    return out


def reply_weights(replies, weighting: str) -> list[float]:
    """Averaging weights of the replies, summing to 1: ``uniform`` (1/|S|, the SCAFFOLD and FedDyn papers) or
    ``samples`` (proportional to each reply's ``num-examples``, as FedAvg)."""
    if weighting == "uniform":
        return [1.0 / len(replies)] * len(replies)
    n = [float(next(iter(r.content.metric_records.values()))[NUM_EXAMPLES]) for r in replies]
    return [x / sum(n) for x in n]


def weighted_mean(replies, weights: list[float]) -> dict:
    """{key: sum_i weights[i] * array_i} over the keys of the replies' arrays, in float64 (numpy arrays)."""
    recs = [r.content["arrays"] for r in replies]
    return {k: sum(w * rec[k].numpy().astype(np.float64) for w, rec in zip(weights, recs, strict=True))
            for k in recs[0].keys()}


@contextmanager
def one_torch_thread():
    """A server-side step (CReFF's re-training, FedIC's three stages) is many small tensor ops run while the client
    actors wait: one thread is fastest, and several threads stall badly on a busy CPU (measured on 2 contended
    cores: CReFF's default re-training 40 s instead of 1 s; FedIC's step 62 s of CPU time instead of 9 s)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
