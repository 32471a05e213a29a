"""Progress and metrics of a Flower app of your own, read from what Flower itself logs.

Pure logic. Flower 1.41 keeps every line a ServerApp writes (its stdout and stderr, Flower's
log lines among them) in the SuperLink's database and serves it through the control API
(`flwr log RUN --stream`); no other channel carries a foreign app's metrics (the Result of
`strategy.start` stays in its process, run events are for other task types). So the
strategies' own log lines are parsed into the events `RunState.apply` takes:

Message API (`flwr.serverapp.strategy`, `Strategy.start`):
    [ROUND n/N]                                  -> round-start (and the planned rounds)
    aggregate_train: Received ...                then
    \t└──> Aggregated MetricRecord: {...}        -> train-done (the round's train metrics)
    aggregate_evaluate: Received ...             then
    \t└──> Aggregated MetricRecord: {...}        -> evaluated
    Global evaluation / \t└──> MetricRecord: {}  -> server-evaluated (a ServerApp-side evaluate_fn)
    Strategy execution finished in ...           -> round-end of the last round
Older API (`flwr.server`, `server_fn` or the default workflows) logs only `[ROUND n]` per
round; its metrics are in the History it logs after `[SUMMARY]`, read at the end.

An app that drives its own loop logs none of this: its run still completes and the
summary says no metrics were reported. Whatever the app prints is kept as its log.
"""

from __future__ import annotations

import ast
import re
import time
from collections.abc import Callable
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Flower's console format: "LEVEL : <padding> message" (after the colour codes are gone).
# "LEVEL : " then (8 - len(LEVEL)) + 1 spaces; with FLWR_LOG_LEVEL=DEBUG a time before the colon.
PREFIX = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) (?:[^\n]*?): (?P<rest>.*)$")
ROUND = re.compile(r"^\[ROUND (?P<n>\d+)(?:/(?P<total>\d+))?\]$")
AGGREGATE = re.compile(
    r"^aggregate_(?P<phase>train|fit|evaluate): [Rr]eceived (?P<results>\d+) results and (?P<failures>\d+) failures"
)
REPLY_ERROR = re.compile(r"^\t?> Received error in reply from node (?P<node>\d+): (?P<error>.*)$")
INITIAL = re.compile(r"^Initial global evaluation results: (?P<record>.*)$")
AGGREGATED = re.compile(r"^\t?└──> Aggregated MetricRecord: (?P<record>.*)$")
SERVER_RECORD = re.compile(r"^\t?└──> MetricRecord: (?P<record>.*)$")
HISTORY = re.compile(r"^History \((?P<what>[^)]*)\):\s*(?P<rest>.*)$")
HISTORY_ROUND = re.compile(r"^round (?P<n>\d+): (?P<value>.+)$")
# nan and inf as Python prints them in a dict (not inside a quoted name): no literal for them.
NOT_NUMBER = re.compile(r"(?<![\w'\"-])-?(?:nan|inf)(?![\w'\"])")


def strip(line: str) -> str:
    return ANSI.sub("", line)


def message(line: str) -> str:
    """A log line's message without Flower's level prefix (a plain print comes back as it is)."""
    plain = strip(line)
    match = PREFIX.match(plain)
    if match is None:
        return plain
    pad = " " * (9 - len(match["level"]))
    rest = match["rest"]
    return rest[len(pad) :] if rest.startswith(pad) else rest.lstrip(" ")


def numbers(text: str) -> dict[str, float] | None:
    """A MetricRecord's repr ({'accuracy': 0.9, ...}) as name -> float (lists and text left out)."""
    try:
        value = ast.literal_eval(NOT_NUMBER.sub("None", text.strip()))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, dict):
        return None
    return {
        str(k): float(v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class LogReader:
    """Turns a ServerApp's log, fed in chunks as they come, into RunState events."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.partial = ""
        self.started = False
        self.round: int | None = None  # the round in progress
        self.phase: str | None = None  # train, evaluate or server: what the next record is
        self.metrics_seen = False
        self.trained = False  # the round in progress got at least one training result
        self.records = 0  # Aggregated MetricRecord lines in the round in progress
        self.pending: dict[str, Any] | None = None  # a phase's failures, until its per-node lines
        self.history: dict[str, list[str]] = {}
        self.in_history: str | None = None
        self.lines: list[str] = []  # the whole log, without colour codes

    def feed(self, text: str) -> list[dict[str, Any]]:
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        out: list[dict[str, Any]] = []
        for line in lines:
            out += self._line(line.rstrip("\r"))
        return out

    def close(self) -> list[dict[str, Any]]:
        """The end of the log: what is left of the last line, the round in progress, the History."""
        out = self._line(self.partial) if self.partial else []
        self.partial = ""
        if self.pending is not None:
            out.append(self.pending)
            self.pending = None
        out += self._end_round()
        out += self._history_events()
        return out

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"event": kind, "time": self.clock(), **fields}

    def _end_round(self) -> list[dict[str, Any]]:
        if self.round is None:
            return []
        ended, self.round = self.round, None
        return [self._event("round-end", round=ended, trained=self.trained)]

    def _line(self, raw: str) -> list[dict[str, Any]]:
        self.lines.append(strip(raw))
        msg = message(raw)
        out: list[dict[str, Any]] = []
        if not self.started and msg.strip():
            self.started = True
            out.append(self._event("started"))
        if self.in_history is not None and self._history_line(msg):
            return out
        text = msg.strip("\t ")
        reply_error = REPLY_ERROR.match(msg.lstrip(" "))
        if self.pending is not None and reply_error is None:
            out.append(self.pending)  # failures no node-by-node line explained
        if reply_error is None:
            self.pending = None
        if match := ROUND.match(text):
            out += self._end_round()
            self.round, self.phase, self.trained, self.records = int(match["n"]), None, False, 0
            if match["total"]:
                out.append(self._event("planned", rounds=int(match["total"])))
            out.append(self._event("round-start", round=self.round))
        elif match := AGGREGATE.match(text):
            self.phase = "train" if match["phase"] in ("train", "fit") else "evaluate"
            failures = int(match["failures"])
            if self.phase == "train" and int(match["results"]) > 0:
                self.trained = True
            if failures and self.round is not None:  # said once: per node if Flower names them
                self.pending = self._failures(failures, int(match["results"]))
        elif (match := reply_error) and self.round is not None:
            self.pending = None  # the failures, node by node
            out.append(
                self._event("errors", round=self.round, phase=self.phase,
                            errors=[{"node": int(match["node"]), "reason": match["error"]}])
            )  # fmt: skip
        elif (match := INITIAL.match(text)) is not None:
            values = numbers(match["record"])
            if values:
                self.metrics_seen = True
                out.append(self._event("server-evaluated", round=0, metrics=values))
        elif text == "Global evaluation":
            self.phase = "server"
        elif (match := AGGREGATED.match(msg.lstrip(" "))) and self.round is not None:
            values = numbers(match["record"])
            # Strategy.start logs the train record, then the evaluate one; a strategy of the
            # app's own may not say which phase replied (Flower's own say aggregate_*: ...).
            phase = self.phase or ("train" if self.records == 0 else "evaluate")
            self.records += 1
            if values is not None and phase in ("train", "evaluate"):
                self.metrics_seen = self.metrics_seen or bool(values)
                kind = "train-done" if phase == "train" else "evaluated"
                out.append(self._event(kind, round=self.round, metrics=values))
                self.trained = self.trained or phase == "train"
            self.phase = None
        elif (match := SERVER_RECORD.match(msg.lstrip(" "))) and self.phase == "server":
            values = numbers(match["record"])
            if values and self.round is not None:
                self.metrics_seen = True
                out.append(self._event("server-evaluated", round=self.round, metrics=values))
            self.phase = None
        elif text.startswith("Strategy execution finished") or text == "[SUMMARY]":
            out += self._end_round()
        elif match := HISTORY.match(text):
            self.in_history = match["what"]
            self.history[self.in_history] = [match["rest"]] if match["rest"] else []
        return out

    def _history_line(self, msg: str) -> bool:
        """A line of the History block after [SUMMARY]; False when the block ended."""
        text = msg.strip("\t ")
        if not text or HISTORY.match(text) or ROUND.match(text):
            self.in_history = None
            return False
        assert self.in_history is not None
        self.history[self.in_history].append(text)
        return True

    def _history_events(self) -> list[dict[str, Any]]:
        """The older API's per-round metrics, from its History (loss and metrics, distributed
        and centralized)."""
        per_round: dict[int, dict[str, dict[str, float]]] = {}

        def put(n: int, kind: str, name: str, value: Any) -> None:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                per_round.setdefault(n, {}).setdefault(kind, {})[name] = float(value)

        for what, lines in self.history.items():
            kind = {
                "loss, distributed": "evaluated",
                "loss, centralized": "server-evaluated",
                "metrics, distributed, fit": "train-done",
                "metrics, distributed, evaluate": "evaluated",
                "metrics, centralized": "server-evaluated",
            }.get(what)
            if kind is None:
                continue
            if what.startswith("loss"):
                for line in lines:
                    if match := HISTORY_ROUND.match(line):
                        put(int(match["n"]), kind, "loss", _number(match["value"]))
                continue
            try:
                series = ast.literal_eval(NOT_NUMBER.sub("None", " ".join(lines)))
            except (ValueError, SyntaxError):
                continue
            if not isinstance(series, dict):
                continue
            for name, points in series.items():
                for point in points if isinstance(points, list) else []:
                    if isinstance(point, tuple) and len(point) == 2:
                        put(int(point[0]), kind, str(name), point[1])
        out = []
        for n in sorted(per_round):
            for kind, values in per_round[n].items():
                if n > 0 or kind == "server-evaluated":
                    self.metrics_seen = True
                    out.append(self._event(kind, round=n, metrics=values))
        return out

    def _failures(self, failures: int, results: int) -> dict[str, Any]:
        phase = "train" if self.phase == "train" else "evaluate"
        return self._event(
            "errors", round=self.round, phase=phase,
            errors=[{"reason": f"{failures} of {failures + results} replies failed (Flower's {phase} phase)"}],
        )  # fmt: skip

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + ("\n" if self.lines else "")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
