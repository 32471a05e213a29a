"""Strategy construction and a recording wrapper around any shipped Flower strategy.

`RecordedStrategy` delegates every decision (sampling, aggregation) to the inner
strategy and adds three things: per-round events for fedfleet's progress display
and summary, evaluation folded into the train phase ("with-train" mode), and a
minimum number of valid replies per round so a run fails loudly instead of
silently keeping an unchanged model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from .settings import EVAL_METRICS, EVAL_RECORD, SITE_RECORD, STRATEGY_OPTIONS, AppSettings

STRATEGY_CLASSES: dict[str, type[flwr_strategy.FedAvg]] = {
    "fedavg": flwr_strategy.FedAvg,
    "fedprox": flwr_strategy.FedProx,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedadagrad": flwr_strategy.FedAdagrad,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "krum": flwr_strategy.Krum,
}
assert set(STRATEGY_CLASSES) == set(STRATEGY_OPTIONS)


Emit = Callable[..., None]


class RoundFailed(RuntimeError):
    """Too few participants replied to a round."""


# The server-side state of Flower's strategies, by attribute: FedAdam, FedYogi and FedAdagrad
# keep their moments (m_t, v_t), FedAvgM its momentum; every strategy here gets the current
# global arrays with each round. A resumed run restores these exactly.
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "current_arrays")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's server state as flat named arrays (`attr/key`, `attr/#i`, `attr/@key`)."""
    out: dict[str, np.ndarray] = {}
    for attr in STATE_ATTRIBUTES:
        value = getattr(strategy, attr, None)
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            out |= {f"{attr}/@{k}": a.numpy() for k, a in value.items()}
        elif isinstance(value, dict):
            out |= {f"{attr}/{k}": np.asarray(v) for k, v in value.items()}
        elif isinstance(value, list):
            out |= {f"{attr}/#{i}": np.asarray(v) for i, v in enumerate(value)}
    return out


def restore_state(strategy: Strategy, state: dict[str, np.ndarray]) -> list[str]:
    """Put back what `strategy_state` took; the attributes restored."""
    restored = []
    for attr in STATE_ATTRIBUTES:
        items = {k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == attr}
        if not items or not hasattr(strategy, attr):
            continue
        first = next(iter(items))
        if first.startswith("@"):
            value: Any = ArrayRecord({k[1:]: Array(v) for k, v in items.items()})
        elif first.startswith("#"):
            value = [items[f"#{i}"] for i in range(len(items))]
        else:
            value = dict(items)
        setattr(strategy, attr, value)
        restored.append(attr)
    return restored


def build_strategy(settings: AppSettings) -> Strategy:
    """The configured Flower strategy, every participant sampled in every round."""
    options: dict[str, Any] = dict(settings.strategy_options)  # checked per strategy in settings.py
    return STRATEGY_CLASSES[settings.strategy](
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=settings.min_participants,
        min_evaluate_nodes=settings.min_participants,
        min_available_nodes=settings.min_participants,
        **options,
    )


class RecordedStrategy(Strategy):
    def __init__(self, inner: Strategy, settings: AppSettings, emit: Emit) -> None:
        self.inner = inner
        self.settings = settings
        self.emit = emit
        self.with_train = settings.evaluation == "with-train"

    def summary(self) -> None:
        self.inner.summary()

    def state(self) -> dict[str, np.ndarray]:
        return strategy_state(self.inner)

    def restore(self, state: dict[str, np.ndarray]) -> list[str]:
        return restore_state(self.inner, state)

    def resume(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        first_round: int,
        num_rounds: int,
        timeout: float,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
    ) -> ArrayRecord:
        """Rounds `first_round`..`num_rounds` from `arrays` (a checkpoint's), as Strategy.start
        runs each round (train, evaluate, then `evaluate_fn`), with the rounds' real numbers:
        strategies that count rounds (FedAdam's bias correction) go on as if never stopped."""
        log(INFO, "Resuming %s at round %s of %s", type(self.inner).__name__, first_round, num_rounds)
        train_config, evaluate_config = ConfigRecord(), ConfigRecord()
        for current in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(current, arrays, train_config, grid), timeout=timeout
            )
            aggregated, metrics = self.aggregate_train(current, replies)
            if aggregated is not None:
                arrays = aggregated
            if metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(current, arrays, evaluate_config, grid), timeout=timeout
            )
            evaluated = self.aggregate_evaluate(current, replies)
            if evaluated is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", evaluated)
            evaluate_fn(current, arrays)
        return arrays

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Round 1 always evaluates the initial model it receives: that is round 0's score.
        config["evaluate-received"] = self.with_train or server_round == 1
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.emit("round-start", round=server_round, nodes=[m.metadata.dst_node_id for m in messages])
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._check_replies("train", server_round, list(replies))
        if any(EVAL_RECORD in m.content.config_records for m in valid):
            self._record_evaluation(server_round - 1, valid, from_train=True)
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        self.emit(
            "train-done",
            round=server_round,
            metrics=dict(metrics or {}),
            sites=[{**_site(m), **_metrics(m)} for m in valid],
        )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.with_train and server_round < self.settings.num_server_rounds:
            return []  # this round's model is evaluated by the next train phase
        self.emit("evaluate-start", round=server_round)
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        if not replies:
            return None
        valid = self._check_replies("evaluate", server_round, replies)
        return self._record_evaluation(server_round, valid, from_train=False)

    def _check_replies(self, phase: str, server_round: int, replies: list[Message]) -> list[Message]:
        valid = [m for m in replies if not m.has_error()]
        errors = [
            {"node": m.metadata.src_node_id, "code": m.error.code, "reason": m.error.reason}
            for m in replies
            if m.has_error()
        ]
        if errors:
            self.emit("errors", phase=phase, round=server_round, errors=errors)
        if len(valid) < self.settings.min_participants:
            raise RoundFailed(
                f"round {server_round} {phase}: {len(valid)} valid replies, fewer than "
                f"min-participants={self.settings.min_participants}"
                + "".join(f"; node {e['node']}: {e['reason']}" for e in errors)
            )
        return valid

    def _record_evaluation(
        self, model_round: int, replies: list[Message], *, from_train: bool
    ) -> MetricRecord:
        """Aggregate per-site evaluation metrics weighted by held-out examples."""
        sites = [
            {**_site(m), **(dict(m.content.config_records[EVAL_RECORD]) if from_train else _metrics(m))}
            for m in replies
        ]
        total = sum(float(s["num-examples"]) for s in sites)
        aggregated = MetricRecord(
            {k: sum(float(s[k]) * float(s["num-examples"]) for s in sites) / total for k in EVAL_METRICS}
        )
        self.emit("evaluated", round=model_round, metrics=dict(aggregated), sites=sites)
        return aggregated


def _metrics(message: Message) -> dict[str, Any]:
    return dict(next(iter(message.content.metric_records.values())))


def _site(message: Message) -> dict[str, Any]:
    site = message.content.config_records.get(SITE_RECORD, ConfigRecord())
    return {"node": message.metadata.src_node_id, **dict(site)}


def timed_emitter(write: Callable[[dict[str, Any]], None]) -> Emit:
    def emit(event: str, **fields: Any) -> None:
        write({"event": event, "time": time.time(), **fields})

    return emit
