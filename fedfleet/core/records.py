"""A run's record, rebuilt from the ServerApp's events: rounds, metrics, timings, best round.

Pure logic: `RunState.apply` takes the JSON events that fl/fedfleet_app writes to
events.jsonl, in order, and keeps everything the progress display and
summary.json need.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

from fedfleet.core.errors import FedfleetError

METRICS = ("loss", "accuracy", "f1", "precision", "recall")


@dataclass
class RoundRecord:
    number: int
    started: float | None = None
    ended: float | None = None
    train: dict[str, float] = field(default_factory=dict)
    train_sites: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, float] = field(default_factory=dict)
    evaluation_sites: list[dict[str, Any]] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)  # a foreign app's ServerApp-side evaluation
    rejected: list[dict[str, Any]] = field(default_factory=list)  # updates screened out
    privacy: dict[str, Any] = field(default_factory=dict)  # the round's DP clipping and noise
    model: str | None = None
    trained: bool = False  # ended after its training (a foreign app's rounds may report no metrics)

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started

    @property
    def client_compute_seconds(self) -> float | None:
        """The slowest site's train (+ evaluate-on-receive) time: the round's critical path."""
        if not self.train_sites:
            return None
        return max(
            float(s.get("train-seconds", 0.0)) + float(s.get("eval-seconds", 0.0)) for s in self.train_sites
        )

    def to_dict(self) -> dict[str, Any]:
        compute = self.client_compute_seconds
        seconds = self.seconds
        out: dict[str, Any] = {
            "round": self.number,
            "metrics": self.evaluation,
            "train": self.train,
            "seconds": seconds,
            "client_compute_seconds": compute,
            "overhead_seconds": None if seconds is None or compute is None else seconds - compute,
            "model": self.model,
            "sites": {
                "train": self.train_sites,
                "evaluate": self.evaluation_sites,
            },
        }
        if self.server:
            out["server_metrics"] = self.server
        if self.rejected:
            out["rejected"] = self.rejected
        if self.privacy:
            out["privacy"] = self.privacy
        return out


class RunState:
    def __init__(self, rounds_planned: int) -> None:
        self.rounds_planned = rounds_planned
        self.rounds: dict[int, RoundRecord] = {}
        self.status = "starting"
        self.error: str | None = None
        self.errors: list[dict[str, Any]] = []
        self.started: float | None = None
        self.finished: float | None = None
        self.nodes: list[int] = []
        self.current_round = 0

    def _round(self, number: int) -> RoundRecord:
        return self.rounds.setdefault(number, RoundRecord(number))

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        at = float(event.get("time", 0.0))
        if kind == "started":
            self.status, self.started = "running", at
        elif kind == "planned":  # a foreign app's rounds, as its strategy announces them
            self.rounds_planned = int(event["rounds"])
        elif kind == "nodes":
            self.nodes = list(event.get("nodes", []))
        elif kind == "round-start":
            self.current_round = int(event["round"])
            self._round(self.current_round).started = at
        elif kind == "train-done":
            record = self._round(int(event["round"]))
            record.train = dict(event.get("metrics", {}))
            record.train_sites = list(event.get("sites", []))
        elif kind == "evaluated":
            record = self._round(int(event["round"]))
            record.evaluation = {k: float(v) for k, v in event.get("metrics", {}).items()}
            record.evaluation_sites = list(event.get("sites", []))
        elif kind == "rejected":
            self._round(int(event["round"])).rejected = list(event.get("updates", []))
        elif kind == "privacy":
            self._round(int(event["round"])).privacy = {
                k: v for k, v in event.items() if k not in ("event", "time", "round")
            }
        elif kind == "server-evaluated":
            self._round(int(event["round"])).server = {
                k: float(v) for k, v in event.get("metrics", {}).items()
            }
        elif kind == "round-end":
            record = self._round(int(event["round"]))
            record.ended, record.model = at, event.get("model")
            record.trained = bool(event.get("trained", False))
        elif kind == "errors":
            self.errors.extend(
                {"round": event.get("round"), "phase": event.get("phase"), **e}
                for e in event.get("errors", [])
            )
        elif kind == "lost":  # nodes fedfleet reported lost: their replies were given up
            self.errors.extend(
                {"round": self.current_round, "node": n, "reason": "SuperNode lost; reply given up"}
                for n in event.get("nodes", [])
            )
        elif kind == "finished":
            self.status, self.finished = "finished", at
        elif kind == "failed":
            self.status, self.finished = "failed", at
            self.error = str(event.get("error"))

    @property
    def metrics_reported(self) -> bool:
        return any(r.train or r.evaluation or r.server for r in self.rounds.values())

    @property
    def completed_rounds(self) -> int:
        """Rounds whose training finished and whose model was saved."""
        return sum(
            1 for n, r in self.rounds.items() if n > 0 and r.ended is not None and (r.train or r.trained)
        )

    def best_round(self, metric: str = "accuracy") -> int | None:
        """Highest `metric` (lowest for loss); ties go to the lower loss, then the later round."""
        scored = [r for r in self.rounds.values() if metric in r.evaluation]
        if not scored:
            return None
        sign = -1.0 if metric == "loss" else 1.0
        best = max(
            scored,
            key=lambda r: (sign * r.evaluation[metric], -r.evaluation.get("loss", 0.0), r.number),
        )
        return best.number

    def rounds_list(self) -> list[dict[str, Any]]:
        return [self.rounds[n].to_dict() for n in sorted(self.rounds)]


@dataclass
class Timings:
    """Seconds since the start of a run at each of its marks (setup, configured, ...)."""

    started: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic() - self.started

    def between(self, start: str, end: str) -> float | None:
        if start in self.marks and end in self.marks:
            return self.marks[end] - self.marks[start]
        return None


@dataclass
class RunRecord:
    """Everything `summary.json` says about one run, filled in by the stages as it goes."""

    run_id: str
    stack: str
    settings: dict[str, Any]
    aggregator: dict[str, Any]
    participants: list[dict[str, Any]]
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    status: str = "starting"
    error: str | None = None
    configure: dict[str, Any] | None = None
    flower_run_id: int | None = None
    flower_status: dict[str, Any] | None = None  # a foreign app's run as `flwr ls` ends it
    stop: dict[str, Any] | None = None
    stop_error: str | None = None
    model: dict[str, Any] | None = None  # the stack's own network (None: the built-in CNN)
    app: dict[str, Any] | None = None  # a Flower app of the user's own (None: the built-in app)
    orchestration: dict[str, Any] | None = None
    collect_errors: list[str] = field(default_factory=list)
    registry: dict[str, Any] | None = None  # where the run is recorded (MLflow), and how that went
    attempts: list[dict[str, Any]] | None = None  # a resumed run: each attempt, the last one this
    resume: str | None = None  # a run that stopped after committed rounds: the command that resumes it

    def serve(self, serving: dict[str, str]) -> None:
        """Which VM serves each participant now (the first that connected)."""
        for entry in self.participants:
            if entry["name"] in serving:
                entry["vm"] = serving[entry["name"]]

    def fail(self, err: BaseException) -> None:
        if isinstance(err, KeyboardInterrupt):
            self.status, self.error = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
        else:
            self.status = "failed"
            self.error = str(err) if isinstance(err, FedfleetError) else f"{type(err).__name__}: {err}"

    def summary(self, state: RunState, timings: Timings) -> dict[str, Any]:
        """The run as summary.json holds it."""
        best = state.best_round("accuracy")
        rounds = state.rounds_list()
        trained = [r for r in rounds if r["round"] > 0 and r["seconds"] is not None]

        def mean(key: str) -> float | None:
            values = [r[key] for r in trained if r[key] is not None]
            return sum(values) / len(values) if values else None

        out: dict[str, Any] = {
            "run_id": self.run_id,
            "stack": self.stack,
            "status": self.status,
            "started_at": self.started_at,
            "settings": self.settings,
            "aggregator": self.aggregator,
            "participants": [_with_examples(p, state) for p in self.participants],
        }
        if self.app is None:
            out["model"] = self.model or {"model": "built-in CNN (fedfleet_app.task.Net)"}
        else:
            reported = state.metrics_reported
            out["app"] = self.app | {
                "metrics_reported": reported,
                **(
                    {}
                    if reported
                    else {"note": "the app's ServerApp logged no metrics Flower's strategies log"}
                ),
            }
        optional = {
            "error": self.error,
            "configure": self.configure,
            "flower_run_id": self.flower_run_id,
            "flower_status": self.flower_status,
            "stop": self.stop,
            "stop_error": self.stop_error,
            "orchestration": self.orchestration,
            "collect_errors": self.collect_errors or None,
            "registry": self.registry,
            "attempts": self.attempts,
            "resume": self.resume,
        }
        out |= {k: v for k, v in optional.items() if v is not None}
        marks = timings.marks
        out |= {
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "rounds_completed": state.completed_rounds,
            "rounds": rounds,
            "best_round": None
            if best is None
            else {
                "round": best,
                "by": "accuracy",
                "metrics": state.rounds[best].evaluation,
                "model": state.rounds[best].model,
            },
            "errors": state.errors,
            "timings": {
                "total_seconds": marks.get("stopped"),
                "setup_seconds": marks.get("setup"),
                "configure_seconds": timings.between("setup", "configured"),
                "submit_seconds": timings.between("configured", "submitted"),
                "training_seconds": timings.between("submitted", "trained"),
                "teardown_seconds": timings.between("trained", "stopped"),
                "round_mean_seconds": mean("seconds"),
                "round_mean_client_compute_seconds": mean("client_compute_seconds"),
                "round_mean_overhead_seconds": mean("overhead_seconds"),
            },
        }
        return out


def _with_examples(entry: dict[str, Any], state: RunState) -> dict[str, Any]:
    """A participant's examples: known up front on the local stack, else as its sites reported."""
    if entry.get("train_examples") is not None:
        return entry
    train = test = None
    for record in state.rounds.values():
        for site in record.train_sites:
            if site.get("participant") == entry["name"] and "num-examples" in site:
                train = int(site["num-examples"])
        for site in record.evaluation_sites:
            if site.get("participant") == entry["name"] and "num-examples" in site:
                test = int(site["num-examples"])
    return entry | {"train_examples": train, "test_examples": test}
