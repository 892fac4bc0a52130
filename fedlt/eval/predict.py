"""Run a predictor over a test set and reduce it to per-class counts (what clients send to the server)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Predictor = Callable[[torch.Tensor], torch.Tensor]  # images -> logits


@torch.no_grad()
def predict_logits(predictor: Predictor, x: torch.Tensor, batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """Logits of ``predictor`` on ``x`` in batches; an empty ``x`` (a client without local test images) gives an
    empty (0, classes) tensor from one call on the empty batch, so masking and scoring see the usual shape."""
    outs = [predictor(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else predictor(x[:0].to(device)).float().cpu()


def absent_class_mask(test_counts: torch.Tensor) -> torch.Tensor:
    """True for classes absent from a client's local test distribution (FedLoGe's ``p_mode=1`` masking)."""
    return test_counts == 0


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    out[:, mask] = float("-inf")
    return out


def class_counts(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, list[int]]:
    """Per-class correct, total and predicted counts: enough for accuracy, per-class and balanced accuracy,
    precision/recall/F1 and G-mean without shipping predictions."""
    pred = logits.argmax(1)
    correct = torch.bincount(labels[pred == labels], minlength=num_classes)
    return {
        "correct": correct.tolist(),
        "total": torch.bincount(labels, minlength=num_classes).tolist(),
        "predicted": torch.bincount(pred, minlength=num_classes).tolist(),
    }


def local_eval_record(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, prefix: str) -> dict:
    """What a client sends for one predictor and one masking variant: per-class correct / predicted counts
    (the server derives every count metric from them and the shared ``total``) and the score metrics, which
    need the predictions and are therefore computed here, by the same code the server uses."""
    from fedlt.eval.metrics import score_metrics

    counts = class_counts(logits, labels, num_classes)
    record = {f"{prefix}/correct": counts["correct"], f"{prefix}/predicted": counts["predicted"]}
    scores = score_metrics(logits.numpy(), labels.numpy(), num_classes)
    record.update({f"{prefix}/{k}": float(v) for k, v in scores.items()})
    return record


def client_eval_record(client_id: int, test_y: torch.Tensor, test_counts: torch.Tensor, train_counts: torch.Tensor,
                       num_classes: int, logits: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """A client's whole evaluate record: its sizes and class totals, then every (predictor name, logits on its
    local test set) scored unmasked and masked (absent classes at -inf). The federated path (the client step)
    and the shared-backbone path (fedlt.core.shared_eval) both build it here, so the keys are the same."""
    mask = absent_class_mask(test_counts)
    record: dict = {"num-examples": int(test_y.numel()), "client-id": client_id,
                    "total": test_counts.tolist(), "train-total": train_counts.tolist()}
    for name, lg in logits:
        for variant, z in (("unmasked", lg), ("masked", apply_mask(lg, mask))):
            record.update(local_eval_record(z, test_y, num_classes, f"{name}/{variant}"))
    return record
