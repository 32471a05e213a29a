"""Resume: every round's commit (checkpoint), the strategies' server state restored exactly,
and each way a resume is refused before anything starts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fedfleet_app.server_app import CheckpointError, load_checkpoint, save_checkpoint
from fedfleet_app.settings import AppSettings
from fedfleet_app.strategy import STRATEGY_CLASSES, build_strategy, restore_state, strategy_state
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from fedfleet.adapters.flwr import write_run_config
from fedfleet.core.errors import ConfigError
from fedfleet.core.records import RunState
from fedfleet.core.stack import load_stack
from fedfleet.sandbox import local_config
from fedfleet.stages import resume

OPTIONS: dict[str, dict[str, float]] = {
    "fedadam": {"eta": 0.05},
    "fedyogi": {"eta": 0.05},
    "fedavgm": {"server_momentum": 0.9},
}


def reply(weights: np.ndarray, examples: int) -> Any:
    """A ClientApp's train reply as the strategies read it."""
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(weights)}), "metrics": MetricRecord({"num-examples": examples})}
    )
    return SimpleNamespace(content=content, has_error=lambda: False, metadata=SimpleNamespace(src_node_id=1))


def one_round(strategy: Any, number: int, weights: np.ndarray) -> np.ndarray:
    """What Strategy.start does in a round, with three sites that each move the weights their way."""
    arrays = ArrayRecord({"w": Array(weights)})
    if isinstance(strategy, flwr_strategy.FedAdagrad | flwr_strategy.FedAdam | flwr_strategy.FedYogi):
        strategy.current_arrays = {"w": weights}  # what configure_train sets
    elif isinstance(strategy, flwr_strategy.FedAvgM) and strategy.current_arrays is None:
        strategy.current_arrays = arrays
    replies = [
        reply((weights + np.sin(np.arange(6) * (site + 1) + number)).astype(np.float32), 10 * (site + 1))
        for site in range(3)
    ]
    aggregated, _ = strategy.aggregate_train(number, replies)
    return aggregated["w"].numpy()


@pytest.mark.parametrize("name", sorted(STRATEGY_CLASSES))
def test_every_strategy_goes_on_after_a_resume_as_if_never_stopped(name: str, tmp_path: Path) -> None:
    settings = AppSettings(
        strategy=name, strategy_options=OPTIONS.get(name, {}), min_participants=3 if name == "bulyan" else 1
    )
    start = np.linspace(-1, 1, 6).astype(np.float32)
    # Uninterrupted: rounds 1..4.
    strategy = build_strategy(settings)
    w = start
    for n in range(1, 5):
        w = one_round(strategy, n, w)
    # Stopped after round 2's commit; a fresh ServerApp restores it and runs rounds 3..4.
    first = build_strategy(settings)
    w2 = start
    for n in (1, 2):
        w2 = one_round(first, n, w2)
    path = save_checkpoint(tmp_path, 2, w2, strategy_state(first), name)
    done, weights, state = load_checkpoint(path)
    second = build_strategy(settings)
    restored = restore_state(second, state)
    for n in (3, 4):
        weights = one_round(second, n, weights)
    assert done == 2
    assert np.array_equal(weights, w), f"{name}: resumed weights differ"
    if name in ("fedadam", "fedyogi", "fedadagrad", "fedavgm"):
        assert restored  # the moments / momentum came back
        # Without them the result differs: the state is what makes the resume exact.
        bare = build_strategy(settings)
        _, weights, _ = load_checkpoint(path)
        for n in (3, 4):
            weights = one_round(bare, n, weights)
        assert not np.array_equal(weights, w)


def test_a_checkpoint_commits_whole_and_keeps_the_last_two(tmp_path: Path) -> None:
    for n in range(4):
        save_checkpoint(tmp_path, n, np.full(3, n, dtype=np.float32), {"m_t/w": np.ones(2)}, "fedadam")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-2.json",
        "round-2.npz",
        "round-3.json",
        "round-3.npz",
    ]
    done, weights, state = load_checkpoint(tmp_path / "round-3.npz")
    assert (done, weights.tolist(), list(state)) == (3, [3.0, 3.0, 3.0], ["m_t/w"])
    data = bytearray((tmp_path / "round-3.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "round-3.npz").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"SHA-256 does not match round-3\.json"):
        load_checkpoint(tmp_path / "round-3.npz")


def stopped_run(
    project: Path, run_id: str = "20261205-100000-abcd", status: str = "failed", rounds: int = 4
) -> Path:
    """A run directory as a run that stopped after two committed rounds leaves it."""
    stack = load_stack(project, "local")
    run_dir = project / "runs" / run_id
    run_dir.mkdir(parents=True)
    settings = stack.app.__class__(**{**stack.app.__dict__, "num_server_rounds": rounds})
    write_run_config(run_dir / "run_config.toml", settings.to_run_config())
    summary = {"run_id": run_id, "stack": "local", "status": status, "rounds_completed": 2}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    for n in (1, 2):
        save_checkpoint(run_dir / "checkpoints", n, np.full(3, n, dtype=np.float32), {}, "fedavg")
    events = [
        {"event": "started", "time": 1.0},
        *(
            e
            for n in (1, 2, 3)
            for e in (
                {"event": "round-start", "time": 10.0 * n, "round": n},
                {
                    "event": "evaluated",
                    "time": 10.0 * n,
                    "round": n - 1,
                    "metrics": {"accuracy": n / 10},
                    "sites": [],
                },
                {
                    "event": "train-done",
                    "time": 10.0 * n + 1,
                    "round": n,
                    "metrics": {"loss": 1 / n},
                    "sites": [],
                },
                *(
                    [
                        {
                            "event": "round-end",
                            "time": 10.0 * n + 2,
                            "round": n,
                            "model": f"models/round-{n}.pt",
                        }
                    ]
                    if n < 3
                    else []
                ),
            )
        ),
        {"event": "failed", "time": 40.0, "error": "killed"},
    ]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "round-')
    return run_dir


def test_a_stopped_run_resumes_from_its_newest_sound_commit(make_project) -> None:
    project = make_project()
    run_dir = stopped_run(project)
    stack = load_stack(project, "local")
    r = resume.check(stack, project, run_dir.name, stack.app, None)
    assert (r.attempt, r.rounds) == (2, 4)
    (run_dir / "checkpoints" / "round-3.npz").write_bytes(b"cut short")  # no manifest: never committed
    resume.latest(r)
    assert (r.done, r.checkpoint) == (2, run_dir / "checkpoints" / "round-2.npz")
    assert r.skipped == ["round-3.npz has no manifest (its commit was cut short)"]
    state = RunState(4)
    resume.seed(r, state)
    assert sorted(state.rounds) == [0, 1, 2] and state.status == "running" and state.completed_rounds == 2
    assert state.rounds[1].evaluation == {"accuracy": 0.2}  # round 1's model, scored in round 2
    # The newest manifest's file corrupted: named, with the fix.
    data = bytearray((run_dir / "checkpoints" / "round-2.npz").read_bytes())
    data[-10] ^= 0xFF
    (run_dir / "checkpoints" / "round-2.npz").write_bytes(bytes(data))
    with pytest.raises(resume.CheckpointProblem) as err:
        resume.latest(r)
    message = str(err.value)
    assert "round-2.npz is corrupted" in message and "Delete round-2.npz and round-2.json" in message


def test_a_resume_that_cannot_be_is_refused_before_anything_starts(make_project) -> None:
    project = make_project()
    stack = load_stack(project, "local")
    run_dir = stopped_run(project)
    cases: list[tuple[Any, str]] = [
        (("20261205-100000-abce", stack.app, None), "no such run under"),
        ((run_dir.name, stack.app, 3), "it was to run 4 rounds; --rounds 3 is fewer"),
        ((run_dir.name, stack.app.__class__(**{**stack.app.__dict__, "learning_rate": 0.5}), None),
         "learning-rate was 0.05, is now 0.5"),
    ]  # fmt: skip
    for (run_id, settings, rounds), says in cases:
        with pytest.raises(ConfigError, match=says.replace(".", r"\.").replace("(", r"\(")):
            resume.check(stack, project, run_id, settings, rounds)
    done = stopped_run(project, "20261205-110000-ffff", status="completed")
    with pytest.raises(ConfigError, match="nothing to resume"):
        resume.check(stack, project, done.name, stack.app, None)
    (run_dir / "run_config.toml").unlink()
    with pytest.raises(ConfigError, match="never started training"):
        resume.check(stack, project, run_dir.name, stack.app, None)
    other = make_project(
        local_config() | {"fedfleet:app": {"path": str(Path(__file__).parent / "fixtures" / "numpy-app")}},
        stack="apps",
    )
    with pytest.raises(ConfigError, match="Flower app of your own"):
        resume.check(load_stack(other, "apps"), project, done.name, stack.app, None)


def test_a_run_resumed_again_keeps_each_rounds_events_once_and_lists_every_attempt(make_project) -> None:
    project = make_project()
    run_dir = stopped_run(project)
    stack = load_stack(project, "local")

    def events(*spec: tuple[str, int]) -> str:
        return "".join(
            json.dumps({"event": e, "time": float(n), "round": n, "metrics": {"loss": 1.0}}) + "\n"
            for e, n in spec
        )

    # Attempt 1 committed rounds 1-2 and trained part of 3; attempt 2 resumed after round 1
    # (round 2's commit was lost with its aggregator), committed 2 and 3, and was killed in
    # round 4; attempt 3 was killed before it wrote anything.
    (run_dir / "events.jsonl").write_text(
        events(("round-start", 1), ("train-done", 1), ("round-end", 1), ("round-start", 2), ("train-done", 2),
               ("round-end", 2), ("round-start", 3), ("train-done", 3))
    )  # fmt: skip
    (run_dir / "events-attempt-2.jsonl").write_text(
        events(("resumed", 1), ("round-start", 2), ("train-done", 2), ("round-end", 2), ("round-start", 3),
               ("train-done", 3), ("round-end", 3), ("round-start", 4), ("train-done", 4))
    )  # fmt: skip
    for n in (2, 3):
        (run_dir / f".attempt-{n}").touch()
    save_checkpoint(run_dir / "checkpoints", 3, np.zeros(3, dtype=np.float32), {}, "fedavg")
    (run_dir / "models").mkdir()
    for n in (3, 4):
        (run_dir / "models" / f"round-{n}.pt").write_bytes(b"x")
    r = resume.check(stack, project, run_dir.name, stack.app, None)
    assert r.attempt == 4
    resume.latest(r)
    assert r.done == 3 and resume.drop_uncommitted(r) == ["round-4.pt"]
    state = RunState(4)
    resume.seed(r, state)
    trained = [e["round"] for e in r.seeded if e["event"] == "train-done"]
    assert trained == [1, 2, 3]  # attempt 1's rounds 2-3 were done again by attempt 2: taken from it
    assert sorted(state.rounds) == [1, 2, 3]
    listed = resume.attempts(r, {"hospital-us": "us-vm-1"}, "completed")
    assert [a["attempt"] for a in listed] == [1, 2, 3, 4]
    assert listed[2]["status"] == "stopped without writing a summary"
    assert listed[3]["status"] == "completed" and listed[3]["resumed_after_round"] == 3
