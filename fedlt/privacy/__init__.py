"""Client-level (user-level) differential privacy: ``privacy=none | dp_central | dp_local``.

* :mod:`fedlt.privacy.params` -- the config group's typed sections (checked by :mod:`fedlt.validate`).
* :mod:`fedlt.privacy.clipping` -- the client's half, called by the one client step: clip the update to norm C
  (and, for ``dp_local``, add the noise) before it leaves the client.
* :mod:`fedlt.privacy.server` -- the server's half, called by the round loop: sampling that matches the
  accountant, the noised aggregate (``dp_central``), adaptive clipping, the budget, the metrics, checkpoint state.
* :mod:`fedlt.privacy.accounting` -- (epsilon, delta) from Google's ``dp-accounting`` (RDP or PLD).

A library module: it imports :mod:`fedlt.config`, :mod:`fedlt.seeding`, Flower's record types, torch and
dp-accounting, nothing of the core or the algorithms; the core calls it, and strategies never see it. With
``privacy=none`` none of it runs (the client step and the round loop only test :func:`enabled`)."""

from fedlt.privacy.params import CENTRAL, LOCAL, MODES, NONE, enabled, mode

__all__ = ["CENTRAL", "LOCAL", "MODES", "NONE", "enabled", "mode"]
