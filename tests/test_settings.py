"""The app's run config and the strategy table (fl/fedfleet_app/settings.py, strategy.py)."""

from __future__ import annotations

import inspect
import tomllib

import pytest
from fedfleet_app.settings import STRATEGY_OPTIONS, AppSettings, SettingsError
from fedfleet_app.strategy import STRATEGY_CLASSES, build_strategy

from fedfleet.sandbox import REPO


def test_every_listed_option_is_a_keyword_of_the_flower_strategy():
    assert set(STRATEGY_CLASSES) == set(STRATEGY_OPTIONS)
    for name, options in STRATEGY_OPTIONS.items():
        params = inspect.signature(STRATEGY_CLASSES[name].__init__).parameters
        for option in options:
            assert option in params, f"{name} has no keyword {option}"


@pytest.mark.parametrize("name", sorted(STRATEGY_OPTIONS))
def test_each_strategy_builds(name: str):
    options = {"proximal_mu": 0.1} if name == "fedprox" else {}
    strategy = build_strategy(AppSettings(strategy=name, strategy_options=options, min_participants=3))
    assert type(strategy) is STRATEGY_CLASSES[name]
    assert strategy.min_available_nodes == 3


def test_run_config_round_trip_and_pyproject_defaults_agree():
    settings = AppSettings(strategy="fedprox", strategy_options={"proximal_mu": 0.5}, classes=("a", "b"))
    assert AppSettings.from_run_config(settings.to_run_config()) == settings
    pyproject = tomllib.loads((REPO / "fl" / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(defaults) == set(AppSettings().to_run_config())
    assert AppSettings.from_run_config(defaults) == AppSettings()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strategy": "fedsgd"}, "strategy must be one of fedavg, fedprox"),
        (
            {"strategy": "fedavg", "strategy-options": {"eta": 1}},
            r"strategy-options.eta must be an option of fedavg: \(it takes none\)",
        ),
        ({"num-server-rounds": 0}, "num-server-rounds must be at least 1"),
        ({"num-server-rounds": "three"}, "num-server-rounds must be a whole number"),
        ({"local-epochs": 1.5}, "local-epochs must be a whole number"),
        ({"channels": 2}, "channels must be 1 .grayscale. or 3"),
        ({"classes": ["a"]}, "classes must be at least two class names"),
        ({"evaluation": "never"}, "evaluation must be one of with-train, separate"),
        ({"learning_rate": 0.1}, "learning_rate is not a setting of the app .did you mean 'learning-rate'"),
    ],
)
def test_invalid_settings_name_the_key(values, message):
    with pytest.raises(SettingsError, match=message):
        AppSettings.from_run_config(values, strict=True)
