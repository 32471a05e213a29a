"""The model registry's pure side: what a run's rounds become as MLflow metrics, and which
round's model best meets the user's criteria.

Names (MLflow metric keys, the round as the step; round 0 is the initial model):
    loss accuracy f1 precision recall      the round's global model, weighted over the sites
    train/<key>                            the round's training, as the strategy aggregated it
    server/<key>                           a Flower app's ServerApp-side evaluation
    participant/<name>/<metric>            one participant's evaluation of the global model
    participant/<name>/train/<key>         one participant's training
    round_seconds                          the round's wall time
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedfleet.core.errors import ConfigError
from fedfleet.core.util import closest

MODEL_METRICS = ("loss", "accuracy", "f1", "precision", "recall")
LOWER_IS_BETTER = frozenset({"loss"})
SITE_FIELDS = frozenset({"node", "participant", "vm", "num-examples", "handler-started", "handler-finished"})
_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(*parts: str) -> str:
    """An MLflow metric name from its parts: characters MLflow refuses become '_'."""
    return "/".join(_KEY.sub("_", p) for p in parts)


def _numbers(values: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    skipped = set(skip)
    return {
        k: float(v)
        for k, v in values.items()
        if k not in skipped and isinstance(v, int | float) and not isinstance(v, bool)
    }


def evaluation_metrics(event: Mapping[str, Any]) -> dict[str, float]:
    """An `evaluated` event as metrics: the aggregate, then each participant's."""
    out = _numbers(event.get("metrics", {}))
    for site in event.get("sites", []):
        who = site.get("participant")
        if who:
            out |= {metric_key("participant", who, k): v for k, v in _numbers(site, SITE_FIELDS).items()}
    return out


def train_metrics(event: Mapping[str, Any]) -> dict[str, float]:
    """A `train-done` event as metrics: the strategy's aggregate, then each participant's."""
    out = {metric_key("train", k): v for k, v in _numbers(event.get("metrics", {})).items()}
    for site in event.get("sites", []):
        who = site.get("participant")
        if who:
            out |= {
                metric_key("participant", who, "train", k): v
                for k, v in _numbers(site, SITE_FIELDS).items()
                if not k.endswith("-seconds") and k != "num-examples"
            }
    return out


def server_metrics(event: Mapping[str, Any]) -> dict[str, float]:
    return {metric_key("server", k): v for k, v in _numbers(event.get("metrics", {})).items()}


def flat_params(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    """A mapping as MLflow parameters `prefix.key` (nested mappings joined with dots)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out |= flat_params(name, value)
        elif value is not None:
            out[name] = str(value)[:6000]  # MLflow's limit for a parameter's value
    return out


# -- criteria ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    metric: str
    value: float
    lower: bool  # True: metric >= value (--min); False: metric <= value (--max)

    def met(self, metrics: Mapping[str, float]) -> bool:
        v = metrics.get(self.metric)
        if v is None or math.isnan(v):
            return False
        return v >= self.value if self.lower else v <= self.value

    def shortfall(self, metrics: Mapping[str, float]) -> float:
        """How far a round is from meeting the bound (0 when it does; inf when it lacks the metric)."""
        v = metrics.get(self.metric)
        if v is None or math.isnan(v):
            return math.inf
        gap = self.value - v if self.lower else v - self.value
        return max(0.0, gap)

    def __str__(self) -> str:
        return f"{self.metric} {'>=' if self.lower else '<='} {self.value:g}"


@dataclass(frozen=True)
class Criteria:
    metric: str
    bounds: tuple[Bound, ...] = ()

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    def describe(self) -> str:
        goal = f"{'highest' if self.higher_is_better else 'lowest'} {self.metric}"
        return goal + (f" with {', '.join(map(str, self.bounds))}" if self.bounds else "")


def parse_bound(text: str, *, lower: bool) -> Bound:
    """`accuracy=0.9` (as given to --min or --max)."""
    option = "--min" if lower else "--max"
    name, sep, number = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(f"{option} {text!r}: expected METRIC=NUMBER, like {option} accuracy=0.9")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(
            f"{option} {text!r}: {number.strip()!r} is not a number; expected METRIC=NUMBER, like "
            f"{option} {name}=0.9"
        ) from None
    if not math.isfinite(value):
        raise ConfigError(f"{option} {text!r}: the bound must be a finite number")
    return Bound(name, value, lower)


def criteria(metric: str, minimums: Sequence[str] = (), maximums: Sequence[str] = ()) -> Criteria:
    bounds = tuple(parse_bound(t, lower=True) for t in minimums)
    bounds += tuple(parse_bound(t, lower=False) for t in maximums)
    return Criteria(metric, bounds)


@dataclass(frozen=True)
class Candidate:
    """One round's model: where it is and what it scored."""

    run: str
    round: int
    metrics: Mapping[str, float]
    model_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.run}:{self.round}"


@dataclass
class Choice:
    """The outcome of `best`: the winner and why, or why none qualifies and the closest round."""

    criteria: Criteria
    considered: int
    winner: Candidate | None = None
    runner_up: Candidate | None = None
    qualified: int = 0
    per_bound: dict[str, int] = field(default_factory=dict)  # bound → rounds meeting it
    unmet: list[str] = field(default_factory=list)  # bounds no round meets
    closest: Candidate | None = None
    closest_misses: list[str] = field(default_factory=list)

    def reason(self) -> str:
        c = self.criteria
        if self.winner is not None:
            value = self.winner.metrics[c.metric]
            text = (
                f"round {self.winner.round} of run {self.winner.run} has the {c.describe()}: "
                f"{c.metric} {value:.4f}, among {self.qualified} of {self.considered} rounds"
            )
            if self.runner_up is not None:
                text += f"; next best {self.runner_up.label} with {self.runner_up.metrics[c.metric]:.4f}"
            return text
        if not c.bounds:
            return f"no round has a {c.metric} ({self.considered} rounds considered)"
        text = f"no round meets {', '.join(map(str, c.bounds))} ({self.considered} rounds considered)"
        if self.unmet:
            text += f"; no round meets {' nor '.join(self.unmet)}"
        if self.closest is not None:
            text += f"; closest: {self.closest.label} ({'; '.join(self.closest_misses)})"
        return text


def choose(candidates: Sequence[Candidate], wanted: Criteria) -> Choice:
    """The round whose model has the best `wanted.metric` among those meeting every bound;
    ties go to the lower loss, then the later round (the model trained longest)."""
    known = sorted({k for c in candidates for k in c.metrics if "/" not in k})
    for name in [wanted.metric, *(b.metric for b in wanted.bounds)]:
        if name not in known and name not in MODEL_METRICS:
            hint = closest(name, known or MODEL_METRICS)
            if hint.startswith("did you mean"):
                hint += f" (the rounds have: {', '.join(known) or 'no metrics'})"
            raise ConfigError(f"unknown metric {name!r}; {hint}")
    scored = [c for c in candidates if _finite(c.metrics.get(wanted.metric))]
    choice = Choice(wanted, considered=len(candidates))
    choice.per_bound = {str(b): sum(b.met(c.metrics) for c in candidates) for b in wanted.bounds}
    choice.unmet = [name for name, n in choice.per_bound.items() if n == 0]
    qualified = [c for c in scored if all(b.met(c.metrics) for b in wanted.bounds)]
    choice.qualified = len(qualified)
    if qualified:
        sign = 1.0 if wanted.higher_is_better else -1.0

        def rank(c: Candidate) -> tuple[float, float, str, int]:
            loss = c.metrics.get("loss", math.inf)
            return (sign * c.metrics[wanted.metric], -loss if _finite(loss) else -math.inf, c.run, c.round)

        ordered = sorted(qualified, key=rank, reverse=True)
        choice.winner = ordered[0]
        choice.runner_up = ordered[1] if len(ordered) > 1 else None
        return choice
    if candidates and wanted.bounds:
        # Closest: the round whose misses, each relative to its bound, add up to the least.
        def miss(c: Candidate) -> float:
            return sum(b.shortfall(c.metrics) / max(abs(b.value), 1e-9) for b in wanted.bounds)

        near = min(candidates, key=lambda c: (miss(c), -c.round))
        choice.closest = near
        choice.closest_misses = [
            f"{b.metric} {near.metrics[b.metric]:.4f} vs {b}"
            if b.metric in near.metrics
            else f"no {b.metric}"
            for b in wanted.bounds
            if not b.met(near.metrics)
        ]
    return choice


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
