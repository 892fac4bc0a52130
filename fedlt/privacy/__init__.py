"""Differential privacy: client-level (``privacy=dp_central | dp_local``) and sample-level (``privacy=dp_sgd``).

* :mod:`fedlt.privacy.params` -- the config group's typed sections (checked by :mod:`fedlt.validate`).
* :mod:`fedlt.privacy.clipping` -- the client's half, called by the one client step: clip the update to norm C
  (and, for ``dp_local``, add the noise) before it leaves the client.
* :mod:`fedlt.privacy.server` -- the server's half, called by the round loop: sampling that matches the
  accountant, the noised aggregate (``dp_central``), adaptive clipping, the budget, the metrics, checkpoint state.
* :mod:`fedlt.privacy.accounting` -- (epsilon, delta) from Google's ``dp-accounting`` (RDP or PLD).
* :mod:`fedlt.privacy.dp_sgd` -- sample-level DP: the DP-SGD local loop every client runs under ``dp_sgd``
  (per-sample gradients with ``torch.func``, clipping, noise, Poisson batches) and its per-client schedule.
* :mod:`fedlt.privacy.secagg` -- secure aggregation (``privacy.secagg=true``, any mode): SecAgg+ from Flower's
  building blocks, driven by the round loop; the server sees only the sum of masked, quantized updates.
* :mod:`fedlt.privacy.attacks` -- membership-inference scoring (loss / confidence thresholds, AUC, advantage,
  per class and head/mid/tail); the ``fedlt-attack`` command that loads a run for it is :mod:`fedlt.attack`.
* :mod:`fedlt.privacy.inversion` -- gradient inversion (DLG / iDLG) of one client's one-step update, plain or as
  the run's DP mode protects it, with PSNR / SSIM (``fedlt-attack --inversion``).

A library module: it imports :mod:`fedlt.config`, :mod:`fedlt.seeding`, Flower's record types, torch and
dp-accounting, and (``dp_sgd`` only) the local loop's pieces in :mod:`fedlt.train.local` and
:mod:`fedlt.data.augment`; nothing of the core or the algorithms: the core calls it, and strategies never see it
(``ClientAlgorithm.local_epochs`` hands over to ``dp_sgd`` under ``privacy=dp_sgd``). With
``privacy=none`` none of it runs (the client step and the round loop only test :func:`enabled`)."""

from fedlt.privacy.params import CENTRAL, DPSGD, LOCAL, MODES, NONE, enabled, mode, secagg_enabled

__all__ = ["CENTRAL", "DPSGD", "LOCAL", "MODES", "NONE", "enabled", "mode", "secagg_enabled"]
