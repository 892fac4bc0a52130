"""Small pieces several strategy files share (not a strategy: names starting with _ are not discovered)."""

from __future__ import annotations

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
