"""The authors' logged learning curves, to compare a fedlt run with (``fedlt-repro``; README "GPU check and the
official curves").

Source: the official FedLoGe repository (Xiao et al., ICLR 2024), github.com/ZackZikaiXiao/FedLoGe, commit
f4cac5260b73236b1ec0afd855e7d0a6ccbeebbc, ``log/b_ours.log`` (FedLoGe) and ``log/b_fedavg.log`` (FedAvg): the lines
``round r, global test acc  A``. Their run: CIFAR-10-LT (official pickles), IF 100, per-class Dirichlet alpha 0.5,
ResNet-18, 40 clients, participation 0.2, 5 local epochs, batch 8, SGD lr 0.03 momentum 0.5, seed 3407, 500 rounds
(the log's file name: ``cifar10_resnet18_cons_frac0.2_iidFalse_iter500_ep5_lr0.03_N40_..._seed3407_..._dirichlet0.5_
IF0.01_LossCE``) -- fedlt's preset ``fedloge_cifar10_a0.5_if100_p0.2``. The log counts rounds from 0 and prints
after that round's training, so its ``round 4`` is fedlt's round 5 (five rounds done); the keys below are
rounds done. The FedAvg log stops after 461 rounds.

What the number is: the global model on the balanced CIFAR-10 test set. For FedLoGe it is the SSE-C model (the
backbone with the frozen sparse ETF classifier: the official training loop's "global test acc"), which fedlt logs
as ``generic/sse_c/accuracy`` (``generic/accuracy`` is GA-FR's psi' unless ``strategy.generic_primary=sse_c``).
"""

from __future__ import annotations

SOURCE = ("ZackZikaiXiao/FedLoGe (official code of FedLoGe, ICLR 2024), commit "
          "f4cac5260b73236b1ec0afd855e7d0a6ccbeebbc, log/b_ours.log and log/b_fedavg.log ('global test acc')")
PRESET = "fedloge_cifar10_a0.5_if100_p0.2"

# rounds done -> accuracy (fraction), as logged (4 decimals)
CURVES: dict[str, dict[int, float]] = {
    "fedloge": {5: 0.1774, 10: 0.2100, 15: 0.2460, 20: 0.3034, 30: 0.2995, 60: 0.4654, 100: 0.5597,
                200: 0.6671, 500: 0.7117},
    "fedavg": {5: 0.2337, 10: 0.2519, 15: 0.3064, 20: 0.3177, 30: 0.3718, 60: 0.5287, 100: 0.6098,
               200: 0.6727},
}
# fedlt's metrics.jsonl key that corresponds to the logged number, per strategy (first present wins)
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "fedloge": ("generic/sse_c/accuracy",),
    "fedavg": ("generic/accuracy",),
}
LABELS = {"fedloge": "FedLoGe (SSE-C)", "fedavg": "FedAvg"}
