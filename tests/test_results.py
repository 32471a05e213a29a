"""Rebuilding a run's record from the ServerApp's events (fedfleet/results.py)."""

from __future__ import annotations

from fedfleet.core.records import RunState


def metrics(acc: float, loss: float) -> dict:
    return {"loss": loss, "accuracy": acc, "f1": acc, "precision": acc, "recall": acc}


def events(accuracies: list[float], losses: list[float]) -> list[dict]:
    out = [
        {"event": "started", "time": 100.0},
        {"event": "round-end", "round": 0, "time": 100.1, "model": "models/round-0.pt"},
    ]
    t = 100.0
    for r in range(1, len(accuracies)):
        out.append({"event": "round-start", "round": r, "time": t + 1})
        site = {"participant": "a", "train-seconds": 0.5, "eval-seconds": 0.1}
        out.append(
            {
                "event": "evaluated",
                "round": r - 1,
                "time": t + 8,
                "metrics": metrics(accuracies[r - 1], losses[r - 1]),
            }
        )
        out.append(
            {
                "event": "train-done",
                "round": r,
                "time": t + 8,
                "metrics": {"train-loss": 1.0},
                "sites": [site, {**site, "train-seconds": 2.0}],
            }
        )
        out.append({"event": "round-end", "round": r, "time": t + 11, "model": f"models/round-{r}.pt"})
        t += 11
    out.append(
        {
            "event": "evaluated",
            "round": len(accuracies) - 1,
            "time": t + 5,
            "metrics": metrics(accuracies[-1], losses[-1]),
        }
    )
    out.append({"event": "finished", "time": t + 6})
    return out


def replay(evts: list[dict], planned: int) -> RunState:
    state = RunState(planned)
    for e in evts:
        state.apply(e)
    return state


def test_rounds_metrics_and_timing_split():
    state = replay(events([0.1, 0.5, 0.8], [2.3, 1.2, 0.6]), planned=2)
    assert state.status == "finished" and state.completed_rounds == 2
    rounds = state.rounds_list()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["seconds"] == 10.0
    assert rounds[1]["client_compute_seconds"] == 2.1  # slowest site: train 2.0 + evaluate 0.1
    assert rounds[1]["overhead_seconds"] == 10.0 - 2.1
    assert rounds[2]["metrics"]["accuracy"] == 0.8


def test_best_round_by_metric_with_loss_as_tiebreak():
    state = replay(events([0.1, 0.9, 0.9, 0.7], [2.0, 0.8, 0.5, 0.4]), planned=3)
    assert state.best_round("accuracy") == 2  # tie on accuracy: the lower loss wins
    assert state.best_round("loss") == 3


def test_failure_and_errors_are_kept():
    state = replay(
        [
            {"event": "started", "time": 1.0},
            {
                "event": "errors",
                "phase": "train",
                "round": 1,
                "errors": [{"node": 7, "code": 0, "reason": "boom"}],
            },
            {"event": "failed", "time": 2.0, "error": "RoundFailed: round 1 train: 2 valid replies"},
        ],
        planned=3,
    )
    assert state.status == "failed" and "RoundFailed" in (state.error or "")
    assert state.errors == [{"round": 1, "phase": "train", "node": 7, "code": 0, "reason": "boom"}]
    assert state.completed_rounds == 0 and state.best_round() is None


def test_a_lost_node_is_kept_with_the_round_it_was_given_up_in():
    state = RunState(3)
    state.apply({"event": "round-start", "round": 2, "time": 1.0, "nodes": [5, 6]})
    state.apply({"event": "lost", "time": 2.0, "nodes": [6]})
    assert state.errors == [{"round": 2, "node": 6, "reason": "SuperNode lost; reply given up"}]
