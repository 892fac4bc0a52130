"""Personalized evaluation (server side of federated evaluation): per-client records -> metrics.

Which model: each client's personal predictor(s) (``ClientAlgorithm.predictors``; the first is primary), built
from the latest global model plus the client's personal state, before or after a personalization step as the
strategy declares (``personalized/stage`` in results.json). Which test set: the client's own local test set
(``eval.local_test``). Who: ALL clients, every evaluated round. Each predictor is scored masked and unmasked
(classes absent from the client's local test set get -inf logits in the masked variant).

Aggregation over clients: the unweighted mean over all clients (the Fed-LT convention) for every metric; for
accuracy also the sample-weighted mean, std, min and 10th percentile. Head/mid/tail: each client's own groups
from its local training distribution (``local_shot_groups``), averaged over the clients that have test samples
in that group (fedloge-protocol.md §5.5, "PM shot accuracy").
"""

from __future__ import annotations

from fedlt.eval.groups import GROUPS, SHOT_RULES, local_shot_groups
from fedlt.eval.metrics import client_spread, count_metrics, group_accuracy, mean_defined

SCORE_KEYS = ("auroc", "auprc", "ece", "confusion_spectral_norm")


def client_metrics(record: dict, prefix: str) -> dict[str, float]:
    """One client's metrics for one predictor/variant from its evaluate record (see ``local_eval_record``)."""
    total = record["total"]
    correct = record[f"{prefix}/correct"]
    m = count_metrics(correct, total, record.get(f"{prefix}/predicted"))
    m.update({k: float(record[f"{prefix}/{k}"]) for k in SCORE_KEYS if f"{prefix}/{k}" in record})
    train = record.get("train-total")
    if train is not None:
        for rule in SHOT_RULES:
            for g, acc in group_accuracy(correct, total, local_shot_groups(train, rule)).items():
                m[f"{rule}/{g}_accuracy"] = acc
    return m


def personalized_metrics(records: list[dict], mask_default: bool) -> tuple[dict, dict]:
    """Records (one per client, any order) -> (scalars, detail).

    Keys: ``personalized/<variant>/<metric>`` for the primary predictor, ``personalized/<metric>`` for its
    default variant (masked iff ``mask_default``), ``personalized/<predictor>/<variant>/<metric>`` for every
    predictor when there are several. Detail: client ids, test sizes and every per-client value."""
    records = sorted(records, key=lambda r: int(r["client-id"]))
    client_ids = [int(r["client-id"]) for r in records]
    weights = [float(r["num-examples"]) for r in records]
    detail: dict = {"client_ids": client_ids, "num_examples": weights}
    prefixes = list(dict.fromkeys(k[: -len("/correct")] for r in records for k in r if k.endswith("/correct")))
    if not prefixes:
        return {}, detail
    predictors = list(dict.fromkeys(p.rsplit("/", 1)[0] for p in prefixes))
    primary = predictors[0]
    scalars: dict = {}
    for prefix in prefixes:
        pred, variant = prefix.rsplit("/", 1)
        per_client = [client_metrics(r, prefix) if f"{prefix}/correct" in r else {} for r in records]
        names = list(dict.fromkeys(k for m in per_client for k in m))
        values = {k: [m.get(k, float("nan")) for m in per_client] for k in names}
        summary = client_spread(values.get("accuracy", []), weights)
        for k in names:
            if k != "accuracy":
                summary[k] = mean_defined(values[k])
        detail[f"{prefix}/per_client_accuracy"] = values.get("accuracy", [])
        detail[f"{prefix}/group_clients"] = {  # how many clients each group accuracy is averaged over
            f"{rule}/{g}": sum(1 for v in values.get(f"{rule}/{g}_accuracy", []) if v == v)
            for rule in SHOT_RULES for g in GROUPS}
        detail[f"{prefix}/per_client"] = values
        if len(predictors) > 1:
            scalars.update({f"personalized/{pred}/{variant}/{k}": v for k, v in summary.items()})
        if pred == primary:
            scalars.update({f"personalized/{variant}/{k}": v for k, v in summary.items()})
            if (variant == "masked") == mask_default:
                scalars.update({f"personalized/{k}": v for k, v in summary.items()})
    return scalars, detail
