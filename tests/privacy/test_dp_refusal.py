"""What client-level DP cannot protect is refused before anything runs, with a message naming it; the privacy
group's YAML files hold exactly the typed defaults."""

from pathlib import Path

import pytest
import yaml

from fedlt.config import ConfigError, param_defaults
from fedlt.privacy import MODES
from fedlt.validate import TOP_LEVEL
from tests.core.probe import ROOT, compose


@pytest.mark.parametrize("mode", ["dp_central", "dp_local"])
@pytest.mark.parametrize("overrides,match", [
    (("strategy=creff",), "per-class gradients"),  # CReFF's class gradients are uploaded besides the update
    (("strategy=centralized",), "chooses its own clients"),
    (("strategy=local",), "share no model arrays"),
])
def test_unprotectable_runs_are_refused(mode, overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose("experiment=smoke", f"privacy={mode}", *overrides)


@pytest.mark.parametrize("overrides", [
    ("strategy=fedavg",),
    ("strategy=fedlc", "strategy.counts=global"),  # global counts come from the split: nothing is uploaded
    ("strategy=fedloge",),  # psi is part of the clipped model update; phi_k never leaves the client
    ("strategy=ditto",),  # the personal model is client state, never uploaded
    ("strategy=fedadam",),  # the server step is post-processing of the noised aggregate
])
def test_strategies_whose_uploads_are_the_model_update_are_accepted(overrides):
    cfg = compose("experiment=smoke", "privacy=dp_central", *overrides)
    assert cfg["privacy"]["name"] == "dp_central"


@pytest.mark.parametrize("overrides,match", [
    (("privacy.sampling=fixed", "privacy.accountant=pld"), "Poisson sampling only"),
    (("privacy.target_epsilon=0.05", "privacy.on_budget=stop"), "no round could run"),
    (("privacy.adaptive_clipping=true",), "2 x clipped_count_stddev"),
    (("backend.min_clients_per_round=2",), "min_clients_per_round must be 1"),
    (("privacy.clip_norm=-1",), "privacy.clip_norm"),
    (("privacy.delta=1.5",), "privacy.delta"),
    (("+privacy.epsilon=1",), "unknown option privacy.epsilon"),
])
def test_bad_central_options_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose("experiment=smoke", "privacy=dp_central", *overrides)


def test_privacy_group_files_hold_the_typed_defaults():
    assert "privacy" in TOP_LEVEL
    folder = Path(ROOT) / "configs" / "privacy"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(MODES)
    for name, params in MODES.items():
        on_disk = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert on_disk.pop("name") == name
        assert on_disk == pytest.approx(param_defaults(params)) if on_disk else param_defaults(params) == {}
    assert compose("experiment=smoke")["privacy"] == {"name": "none", **param_defaults(MODES["none"])}  # default
    assert param_defaults(MODES["none"]) == {k: v for k, v in param_defaults(MODES["dp_central"]).items()
                                             if k.startswith("secagg")}  # none: only the secagg options (off)
