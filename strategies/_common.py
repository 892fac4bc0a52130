"""Small pieces several strategy files share (not a strategy: names starting with _ are not discovered)."""

from __future__ import annotations

from fedlt.config import ConfigError


def require_ce(cfg: dict, why: str) -> None:
    """Strategies defined by their own client loss refuse ``loss=`` other than ce instead of ignoring it."""
    name = (cfg.get("loss") or {}).get("name", "ce")
    if name != "ce":
        raise ConfigError(f"invalid value loss={name} for strategy={cfg['strategy']['name']}: {why}, so its loss "
                          f"is not selectable; leave loss=ce (the default).")
