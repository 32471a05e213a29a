"""A run's record, rebuilt from the ServerApp's events: rounds, metrics, timings, best round.

Pure logic: `RunState.apply` takes the JSON events that fl/fedfleet_app writes to
events.jsonl, in order, and keeps everything the progress display and
summary.json need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    model: str | None = None

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
        return {
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
        elif kind == "round-end":
            record = self._round(int(event["round"]))
            record.ended, record.model = at, event.get("model")
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
    def completed_rounds(self) -> int:
        """Rounds whose training finished and whose model was saved."""
        return sum(1 for n, r in self.rounds.items() if n > 0 and r.ended is not None and r.train)

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
