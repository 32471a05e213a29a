"""Strategy construction and a recording wrapper around any shipped Flower strategy.

`RecordedStrategy` delegates every decision (sampling, aggregation) to the inner
strategy (optionally inside one of Flower's differential-privacy wrappers) and adds:
per-round events for fedfleet's progress display and summary, evaluation folded into
the train phase ("with-train" mode), screening of every train reply before it reaches
the aggregation (`screen`: arrays that are not the global model's, NaN/Inf, an update
norm above the bounds), and a minimum number of accepted replies per round so a run
fails loudly instead of silently keeping an unchanged model.
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
    "multikrum": flwr_strategy.MultiKrum,
    "bulyan": flwr_strategy.Bulyan,
}
DP_WRAPPERS: dict[str, Any] = {
    "server-fixed": flwr_strategy.DifferentialPrivacyServerSideFixedClipping,
    "server-adaptive": flwr_strategy.DifferentialPrivacyServerSideAdaptiveClipping,
    "client-fixed": flwr_strategy.DifferentialPrivacyClientSideFixedClipping,
    "client-adaptive": flwr_strategy.DifferentialPrivacyClientSideAdaptiveClipping,
}
assert set(STRATEGY_CLASSES) == set(STRATEGY_OPTIONS)


Emit = Callable[..., None]


class RoundFailed(RuntimeError):
    """Too few participants replied to a round."""


# The server-side state of Flower's strategies, by attribute: FedAdam, FedYogi and FedAdagrad
# keep their moments (m_t, v_t), FedAvgM its momentum; every strategy here gets the current
# global arrays with each round. A resumed run restores these exactly.
# A differential-privacy wrapper's adaptive clipping norm is state too; the strategy it wraps
# (`.strategy`) keeps its own, saved under `strategy.` names.
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "current_arrays", "clipping_norm")


def _layers(strategy: Strategy) -> list[tuple[str, Any]]:
    """The strategy and those it wraps, with the prefix of each one's state names."""
    out: list[tuple[str, Any]] = []
    prefix, current = "", strategy  # type: str, Any
    while current is not None:
        out.append((prefix, current))
        prefix, current = prefix + "strategy.", getattr(current, "strategy", None)
    return out


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's server state as flat named arrays (`attr/key`, `attr/#i`, `attr/@key`,
    `attr/=` for a number)."""
    out: dict[str, np.ndarray] = {}
    for prefix, layer in _layers(strategy):
        for attr in STATE_ATTRIBUTES:
            value = getattr(layer, attr, None)
            name = prefix + attr
            if value is None:
                continue
            if isinstance(value, ArrayRecord):
                out |= {f"{name}/@{k}": a.numpy() for k, a in value.items()}
            elif isinstance(value, dict):
                out |= {f"{name}/{k}": np.asarray(v) for k, v in value.items()}
            elif isinstance(value, list):
                out |= {f"{name}/#{i}": np.asarray(v) for i, v in enumerate(value)}
            elif isinstance(value, int | float):
                out[f"{name}/="] = np.asarray(float(value))
    return out


def restore_state(strategy: Strategy, state: dict[str, np.ndarray]) -> list[str]:
    """Put back what `strategy_state` took; the attributes restored."""
    restored = []
    for prefix, layer in _layers(strategy):
        for attr in STATE_ATTRIBUTES:
            name = prefix + attr
            items = {k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == name}
            if not items or not hasattr(layer, attr):
                continue
            first = next(iter(items))
            if first == "=":
                value: Any = float(items["="])
            elif first.startswith("@"):
                value = ArrayRecord({k[1:]: Array(v) for k, v in items.items()})
            elif first.startswith("#"):
                value = [items[f"#{i}"] for i in range(len(items))]
            else:
                value = dict(items)
            setattr(layer, attr, value)
            restored.append(name)
    return restored


def build_strategy(settings: AppSettings) -> Strategy:
    """The configured Flower strategy, every participant sampled in every round, inside the
    configured differential-privacy wrapper if any."""
    options: dict[str, Any] = dict(settings.strategy_options)  # checked per strategy in settings.py
    for key in ("num_malicious_nodes", "num_nodes_to_select"):
        if key in options:
            options[key] = int(options[key])
    strategy = STRATEGY_CLASSES[settings.strategy](
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=settings.min_participants,
        min_evaluate_nodes=settings.min_participants,
        min_available_nodes=settings.min_participants,
        **options,
    )
    if not settings.dp:
        return strategy
    # num_sampled_clients: set each round to the participants asked (RecordedStrategy)
    if settings.dp.endswith("fixed"):
        return DP_WRAPPERS[settings.dp](
            strategy, settings.dp_noise_multiplier, settings.dp_clipping_norm, settings.min_participants
        )  # type: ignore[no-any-return]
    return DP_WRAPPERS[settings.dp](  # type: ignore[no-any-return]
        strategy,
        settings.dp_noise_multiplier,
        settings.min_participants,
        initial_clipping_norm=settings.dp_clipping_norm,
        target_clipped_quantile=settings.dp_target_quantile,
        clip_norm_lr=settings.dp_clip_norm_lr,
        # the noise on the count of clipped updates: Flower's default (participants / 20) is too
        # small for a few silos; at least the noise multiplier keeps the effective one within 16 %
        clipped_count_stddev=max(settings.min_participants / 20, settings.dp_noise_multiplier),
    )


def _norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return float(
        np.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - reference[k]) ** 2)) for k in reference))
    )


def screen(
    replies: list[Message],
    reference: dict[str, np.ndarray],
    max_norm: float,
    max_ratio: float,
    *,
    record: str = "arrays",
    required_metrics: tuple[str, ...] = ("num-examples",),
) -> tuple[list[Message], list[dict[str, Any]]]:
    """The train replies fit to aggregate, and why each other one was rejected: it is not one
    ArrayRecord named `record` and one MetricRecord holding `required_metrics` with the keys
    most replies have, its arrays are not the global model's (names, shapes, dtypes) or hold
    NaN or Inf, its weight (num-examples) is not a positive number, or its update norm is above
    `max_norm` or, with three updates or more, `max_ratio` times the median norm of the other
    updates (0 turns a bound off; with two, neither can tell which one is odd)."""
    kept: list[tuple[Message, float]] = []
    rejected: list[dict[str, Any]] = []

    def reject(message: Message, reason: str, norm: float | None = None) -> None:
        rejected.append({**_site(message), "reason": reason, **({"norm": norm} if norm is not None else {})})

    key_sets = [
        frozenset(next(iter(m.content.metric_records.values())).keys())
        for m in replies
        if len(m.content.metric_records) == 1
    ]
    usual = max(set(key_sets), key=key_sets.count) if key_sets else frozenset()
    for message in replies:
        names = list(message.content.array_records.keys())
        if names != [record]:
            reject(message, f"array records {names} instead of ['{record}']")
            continue
        metric_records = list(message.content.metric_records.values())
        if len(metric_records) != 1:
            reject(message, f"{len(metric_records)} metric records instead of one")
            continue
        missing = [k for k in required_metrics if k not in metric_records[0]]
        if missing or frozenset(metric_records[0].keys()) != usual:
            reject(
                message,
                f"metrics {sorted(metric_records[0].keys())} instead of {sorted(usual | set(required_metrics))}",
            )
            continue
        arrays = {k: a.numpy() for k, a in message.content.array_records[record].items()}
        if set(arrays) != set(reference):
            reject(message, f"arrays {sorted(arrays)} instead of {sorted(reference)}")
            continue
        wrong = [
            f"{k}: {a.dtype}{list(a.shape)} instead of {reference[k].dtype}{list(reference[k].shape)}"
            for k, a in arrays.items()
            if a.shape != reference[k].shape or a.dtype != reference[k].dtype
        ]
        if wrong:
            reject(message, "; ".join(wrong))
            continue
        bad = [k for k, a in arrays.items() if not np.all(np.isfinite(a))]
        if bad:
            reject(message, f"NaN or Inf in {', '.join(bad)}")
            continue
        weight = _metrics(message).get("num-examples")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < float("inf"):
            reject(message, f"num-examples {weight!r} is not a positive number")
            continue
        norm = _norm(arrays, reference)
        if max_norm and norm > max_norm:
            reject(message, f"update norm {norm:.4g} above max-update-norm {max_norm:g}", norm)
            continue
        kept.append((message, norm))
    if max_ratio and len(kept) >= 3:
        norms = [n for _, n in kept]
        accepted = []
        for i, (message, norm) in enumerate(kept):
            median = float(np.median(norms[:i] + norms[i + 1 :]))
            if median > 0 and norm > max_ratio * median:
                reject(
                    message,
                    f"update norm {norm:.4g} above {max_ratio:g} x the median of the others ({median:.4g})",
                    norm,
                )
            else:
                accepted.append((message, norm))
        kept = accepted
    return [m for m, _ in kept], rejected


class RecordedStrategy(Strategy):
    def __init__(self, inner: Strategy, settings: AppSettings, emit: Emit) -> None:
        self.inner = inner
        self.settings = settings
        self.emit = emit
        self.with_train = settings.evaluation == "with-train"
        self._sent: dict[int, dict[str, np.ndarray]] = {}  # each round's global arrays, for screening

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
        self._sent = {server_round: {k: a.numpy() for k, a in arrays.items()}}
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if hasattr(self.inner, "num_sampled_clients"):  # a DP wrapper: its noise scales with who is asked
            self.inner.num_sampled_clients = max(1, len(messages))
        self.emit("round-start", round=server_round, nodes=[m.metadata.dst_node_id for m in messages])
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._check_replies("train", server_round, list(replies))
        if any(EVAL_RECORD in m.content.config_records for m in valid):
            self._record_evaluation(server_round - 1, valid, from_train=True)
        valid = self._screen(server_round, valid)
        clipping = getattr(self.inner, "clipping_norm", None)
        if hasattr(self.inner, "num_sampled_clients"):  # a DP wrapper: the noise is for those aggregated
            self.inner.num_sampled_clients = len(valid)
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        if arrays is None:  # e.g. Bulyan or Krum with fewer replies than they need: no new model
            raise RoundFailed(
                f"round {server_round} train: {self.settings.strategy} aggregated nothing from "
                f"{len(valid)} accepted updates (Bulyan needs at least 4 x num_malicious_nodes + 3, Krum "
                "more than 2 x num_malicious_nodes + 2); lower num_malicious_nodes or add participants"
            )
        # The global model keeps the model's dtypes (FedAdam, FedYogi and FedAdagrad compute in float64).
        reference = self._sent.get(server_round, {})
        arrays = ArrayRecord(
            {
                k: Array(a.numpy().astype(reference[k].dtype, copy=False)) if k in reference else a
                for k, a in arrays.items()
            }
        )
        if clipping is not None:
            self._record_privacy(server_round, float(clipping))
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

    def _screen(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies fit to aggregate; the rest recorded with participant and round."""
        reference = self._sent.get(server_round)
        if reference is None:  # never configured here (cannot happen in a run): nothing to compare
            return replies
        from flwr.supercore.differential_privacy import KEY_NORM_BIT

        innermost = _layers(self.inner)[-1][1]
        kept, rejected = screen(
            replies, reference, self.settings.max_update_norm, self.settings.max_update_norm_ratio,
            record=str(getattr(innermost, "arrayrecord_key", "arrays")),
            required_metrics=("num-examples", *([KEY_NORM_BIT] if self.settings.dp == "client-adaptive" else [])),
        )  # fmt: skip
        if rejected:
            self.emit("rejected", round=server_round, updates=rejected)
            log(INFO, "round %s: %s update(s) rejected: %s", server_round, len(rejected), rejected)
        why = [f"{r.get('participant') or r['node']}: {r['reason']}" for r in rejected]
        self._require(f"round {server_round} train", len(kept), "updates accepted", why)
        return kept

    def _require(self, what: str, count: int, noun: str, why: list[str]) -> None:
        """Fail the round when fewer than min-participants replies are left, saying why."""
        if count < self.settings.min_participants:
            raise RoundFailed(
                f"{what}: {count} {noun}, fewer than min-participants={self.settings.min_participants}"
                + "".join(f"; {w}" for w in why)
            )

    def _record_privacy(self, server_round: int, clipping: float) -> None:
        """The round's differential privacy: the clipping norm updates were clipped to, and the
        noise added as Flower's wrapper adds it (its effective noise multiplier, which adaptive
        modes raise to pay for the noised clipped count, and the clipping norm after the round's
        update, which adaptive modes apply to the noise)."""
        noise = float(getattr(self.inner, "noise_multiplier", self.settings.dp_noise_multiplier))
        after = float(getattr(self.inner, "clipping_norm", clipping))
        sampled = max(1, int(getattr(self.inner, "num_sampled_clients", 1)))
        noise_norm = after if self.settings.dp.endswith("adaptive") else clipping
        self.emit(
            "privacy",
            round=server_round,
            mode=self.settings.dp,
            noise_multiplier=noise,
            clipping_norm=clipping,
            noise_stddev=noise * noise_norm / sampled,
            next_clipping_norm=after,
        )

    def _check_replies(self, phase: str, server_round: int, replies: list[Message]) -> list[Message]:
        valid = [m for m in replies if not m.has_error()]
        errors = [
            {"node": m.metadata.src_node_id, "code": m.error.code, "reason": m.error.reason}
            for m in replies
            if m.has_error()
        ]
        if errors:
            self.emit("errors", phase=phase, round=server_round, errors=errors)
        why = [f"node {e['node']}: {e['reason']}" for e in errors]
        self._require(f"round {server_round} {phase}", len(valid), "valid replies", why)
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
