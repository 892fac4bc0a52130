"""Each strategy's hyper-parameters live in one place, its ``Params`` dataclass: the YAML entry point holds the
same options with the same defaults, and validation refuses unknown, mistyped and out-of-range values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fedlt.config import ConfigError, check_params, param_defaults
from strategies import STRATEGIES, get_strategy

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "strategy"


@pytest.mark.parametrize("name", STRATEGIES)
def test_yaml_holds_exactly_the_dataclass_defaults(name):
    server = get_strategy(name)
    assert dataclasses.is_dataclass(server.params), f"{name}: Server.params must be a dataclass"
    on_disk = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert on_disk.pop("name") == name
    assert on_disk == param_defaults(server.params)


@pytest.mark.parametrize("name", STRATEGIES)
def test_unknown_option_is_refused(name):
    section = {"name": name, **param_defaults(get_strategy(name).params), "no_such_option": 1}
    with pytest.raises(ConfigError, match="strategy.no_such_option"):
        check_params({"strategy": section}, "strategy", get_strategy(name).params)


def test_types_ranges_choices_and_optional_values():
    params = get_strategy("fedloge").params
    good = {"name": "fedloge", **param_defaults(params)}
    assert check_params({"strategy": good}, "strategy", params).gamma == 0.1
    for key, bad, text in (("gamma", 0.0, "gamma=0.0"), ("beta", "x", "beta='x'"), ("bias", "random", "bias='random'"),
                           ("transfer_normalised_psi", 1, "transfer_normalised_psi=1"),
                           ("refine_steps", 1.5, "refine_steps=1.5")):
        with pytest.raises(ConfigError, match=text):
            check_params({"strategy": {**good, key: bad}}, "strategy", params)
    ditto = get_strategy("ditto").params
    section = {"name": "ditto", **param_defaults(ditto)}
    assert check_params({"strategy": section}, "strategy", ditto).personal_epochs is None  # null allowed
    assert check_params({"strategy": {**section, "personal_epochs": 3}}, "strategy", ditto).personal_epochs == 3
    with pytest.raises(ConfigError, match="personal_epochs=-1"):
        check_params({"strategy": {**section, "personal_epochs": -1}}, "strategy", ditto)
