"""The app's run config, typed: read once from Flower's run config, written by fedfleet.

Pure Python (no Flower, no torch) so the fedfleet CLI validates a stack's training
settings with the same definitions the ServerApp and ClientApp read at run time.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .data import DataSpec

# Flower's shipped message-API strategies (flwr.serverapp.strategy) that work with
# any model, and the keyword arguments of each that a stack may set.
STRATEGY_OPTIONS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": ("proximal_mu",),
    "fedavgm": ("server_learning_rate", "server_momentum"),
    "fedadam": ("eta", "eta_l", "beta_1", "beta_2", "tau"),
    "fedyogi": ("eta", "eta_l", "beta_1", "beta_2", "tau"),
    "fedadagrad": ("eta", "eta_l", "tau"),
    "fedmedian": (),
    "fedtrimmedavg": ("beta",),
    "krum": ("num_malicious_nodes",),
    "multikrum": ("num_malicious_nodes", "num_nodes_to_select"),
    "bulyan": ("num_malicious_nodes",),
}
# Flower's differential-privacy wrappers around the strategy: noise added to the aggregate
# on the server; updates clipped on the server (after they arrive) or on each site (before
# they leave it), to a fixed norm or to one adapted each round to a quantile of the norms.
DP_MODES = ("", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")

# "with-train": each train message first evaluates the model it received (the
#   previous round's global model) on the site's held-out split, so a round costs
#   one Flower phase instead of two; one evaluate phase follows the last round.
# "separate": Flower's usual train phase then evaluate phase in every round.
EVALUATION_MODES = ("with-train", "separate")

# Records in reply messages beside the one ArrayRecord and one MetricRecord that
# Flower's strategies aggregate (their consistency checks ignore ConfigRecords).
EVAL_RECORD = "received-model-evaluation"
# The one Array in a message's ArrayRecord: the model as one vector (task.to_vector).
WEIGHTS = "weights"
SITE_RECORD = "site"
EVAL_METRICS = ("loss", "accuracy", "f1", "precision", "recall")


MODEL_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def model_file(ref: str) -> str | None:
    """The file of the module holding the model factory `ref` (module:function), found
    without importing it (the ClientApp imports no torch); None if it cannot be found."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(ref.partition(":")[0])
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


class SettingsError(ValueError):
    """A run-config value is invalid; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class AppSettings:
    num_server_rounds: int = 3
    strategy: str = "fedavg"
    strategy_options: dict[str, float] = field(default_factory=dict)
    local_epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 0.05
    classes: tuple[str, ...] = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
    image_size: int = 8
    channels: int = 1
    test_fraction: float = 0.2
    split_seed: int = 0
    model_seed: int = 0
    evaluation: str = "with-train"
    min_participants: int = 2
    round_timeout: float = 300.0
    node_wait_timeout: float = 120.0
    output_dir: str = ""
    # The network to train: "" for the built-in CNN (task.Net), or "module:function" of a
    # factory inside the app (fedfleet puts the stack's model file there): function(
    # num_classes=, channels=, image_size=) returns a torch.nn.Module.
    model: str = ""
    # Under Flower's simulation engine a node's config holds only partition-id:
    # its data is then read from <simulation-data-root>/<partition-id>.
    simulation_data_root: str = ""
    # A resumed run: the checkpoint (checkpoints/round-K.npz, on the aggregator) it continues
    # from, with rounds K+1 .. num-server-rounds; "" starts from round 1.
    resume_from: str = ""
    # Updates that cannot poison the model: a reply whose arrays are not the global model's
    # (names, shapes, dtypes) or hold NaN/Inf is always rejected; so is one whose update norm
    # ||w_site - w_global|| exceeds max-update-norm (0: no absolute bound) or, with three
    # updates or more, max-update-norm-ratio times the median norm of the round's other updates
    # (0: none; honest sites of very different sizes differ by tens of times in round 1).
    max_update_norm: float = 0.0
    max_update_norm_ratio: float = 100.0
    # Differential privacy (DP_MODES; "" for none): Gaussian noise with standard deviation
    # dp-noise-multiplier x clipping norm / participants on the aggregate; updates clipped
    # to dp-clipping-norm (adaptive modes: its initial value, moved each round by
    # dp-clip-norm-lr toward the dp-target-quantile of the updates' norms).
    dp: str = ""
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 10.0
    dp_target_quantile: float = 0.5
    dp_clip_norm_lr: float = 0.2

    def __post_init__(self) -> None:
        _check(self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds, "at least 1")
        _check(
            self.strategy in STRATEGY_OPTIONS,
            "strategy",
            self.strategy,
            f"one of {', '.join(STRATEGY_OPTIONS)}",
        )
        allowed = STRATEGY_OPTIONS.get(self.strategy, ())
        for key, value in self.strategy_options.items():
            _check(
                key in allowed,
                f"strategy-options.{key}",
                value,
                f"an option of {self.strategy}: {', '.join(allowed) or '(it takes none)'}",
            )
            _check(
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                f"strategy-options.{key}",
                value,
                "a number",
            )
        _check(self.local_epochs >= 1, "local-epochs", self.local_epochs, "at least 1")
        _check(self.batch_size >= 1, "batch-size", self.batch_size, "at least 1")
        _check(0 < self.learning_rate <= 10, "learning-rate", self.learning_rate, "in (0, 10]")
        _check(len(self.classes) >= 2, "classes", list(self.classes), "at least two class names")
        _check(
            len(set(self.classes)) == len(self.classes),
            "classes",
            list(self.classes),
            "distinct class names",
        )
        _check(2 <= self.image_size <= 1024, "image-size", self.image_size, "in 2..1024")
        _check(self.channels in (1, 3), "channels", self.channels, "1 (grayscale) or 3 (RGB)")
        _check(0 < self.test_fraction < 1, "test-fraction", self.test_fraction, "in (0, 1)")
        _check(
            self.evaluation in EVALUATION_MODES,
            "evaluation",
            self.evaluation,
            f"one of {', '.join(EVALUATION_MODES)}",
        )
        _check(self.min_participants >= 1, "min-participants", self.min_participants, "at least 1")
        _check(self.round_timeout > 0, "round-timeout", self.round_timeout, "positive seconds")
        _check(self.node_wait_timeout > 0, "node-wait-timeout", self.node_wait_timeout, "positive seconds")
        _check(
            math.isfinite(self.max_update_norm) and self.max_update_norm >= 0,
            "max-update-norm",
            self.max_update_norm,
            "0 (no absolute bound) or a positive number",
        )
        _check(
            self.max_update_norm_ratio == 0 or 1 < self.max_update_norm_ratio <= 1e6,
            "max-update-norm-ratio",
            self.max_update_norm_ratio,
            "0 (off) or a number above 1 (times the median norm of the other updates)",
        )
        _check(self.dp in DP_MODES, "dp", self.dp, f"one of {', '.join(repr(m) for m in DP_MODES)}")
        _check(
            0 <= self.dp_noise_multiplier <= 100,
            "dp-noise-multiplier",
            self.dp_noise_multiplier,
            "in 0..100 (the noise's standard deviation in units of the clipping norm)",
        )
        _check(0 < self.dp_clipping_norm <= 1e6, "dp-clipping-norm", self.dp_clipping_norm, "in (0, 1e6]")
        _check(0 < self.dp_target_quantile < 1, "dp-target-quantile", self.dp_target_quantile, "in (0, 1)")
        _check(0 < self.dp_clip_norm_lr <= 10, "dp-clip-norm-lr", self.dp_clip_norm_lr, "in (0, 10]")
        f = int(self.strategy_options.get("num_malicious_nodes", 0))
        need = 4 * f + 3 if self.strategy == "bulyan" else 1  # Flower's Bulyan aggregates nothing with fewer
        _check(
            self.min_participants >= need,
            "min-participants",
            self.min_participants,
            f"at least {need} for {self.strategy} with num_malicious_nodes={f} (it aggregates nothing with fewer)",
        )
        _check(
            not self.model or MODEL_REF.fullmatch(self.model) is not None,
            "model",
            self.model,
            "empty (the built-in CNN) or module:function",
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(
            classes=self.classes,
            image_size=self.image_size,
            channels=self.channels,
            test_fraction=self.test_fraction,
            seed=self.split_seed,
        )

    def to_run_config(self) -> dict[str, Any]:
        """Flower run config (kebab-case keys, TOML scalars)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "strategy_options":
                out["strategy-options"] = json.dumps(value, sort_keys=True)
            elif key == "classes":
                out["classes"] = json.dumps(list(value))
            else:
                out[key.replace("_", "-")] = value
        return out

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(name.replace("_", "-") for name in asdict(cls()))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *, strict: bool = False) -> AppSettings:
        """Build from kebab-case keys; with `strict`, unknown keys are an error."""
        known = cls.keys()
        if strict:
            for key in run_config:
                if key not in known:
                    close = difflib.get_close_matches(str(key), known, n=1)
                    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                    raise SettingsError(str(key), f"is not a setting of the app ({hint})")
        kwargs: dict[str, Any] = {}
        for name, default in asdict(cls()).items():
            key = name.replace("_", "-")
            if key in run_config:
                kwargs[name] = _convert(key, run_config[key], default)
        return cls(**kwargs)


def _convert(key: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, dict | tuple):
            if isinstance(value, str):
                value = json.loads(value)
            if isinstance(default, dict):
                if not isinstance(value, dict):
                    raise TypeError("a mapping")
                return dict(value)
            if not isinstance(value, list | tuple):
                raise TypeError("a list")
            return tuple(str(v) for v in value)
        if isinstance(value, bool):
            raise TypeError(type(default).__name__)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise TypeError("a whole number")
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        expected = {int: "a whole number", float: "a number", str: "a string"}.get(type(default), str(err))
        raise SettingsError(key, f"must be {expected} (got {value!r})") from err


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise SettingsError(key, f"must be {expected} (got {value!r})")
