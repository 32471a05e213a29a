"""The model registry: a run's record in MLflow, `models list|best|download`, the criteria,
the UI. A real MLflow store (SQLite and an artifact folder in a scratch project); the run's
events are shaped as the ServerApp writes them, with real models saved as it saves them."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from fedfleet_app.task import Net

from fedfleet.adapters import mlflow as store_mod
from fedfleet.cli import app as cli_app
from fedfleet.core import registry as names
from fedfleet.core.errors import ConfigError, FedfleetError
from fedfleet.core.registry import Candidate, criteria
from fedfleet.core.stack import load_stack
from fedfleet.sandbox import local_config, scratch_project
from fedfleet.stages import record
from fedfleet.workflow import registry_for

from .conftest import running_processes_mentioning
from .test_cli_errors import fedfleet

SITES = ("hospital-us", "hospital-eu")
# accuracy, f1, loss of each round's model (round 0: the initial one)
SCORES = {0: (0.10, 0.05, 2.30), 1: (0.62, 0.58, 1.10), 2: (0.81, 0.74, 0.52), 3: (0.79, 0.77, 0.49)}


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def cli(project: Path, *args: str) -> Result:
    """The command line in this process (MLflow imported once): exit status, stdout, stderr,
    as `fedfleet` gives them. A few calls per command go through a real process too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            returned = cli_app.app(["--project", str(project), *args], standalone_mode=False)
            code = returned if isinstance(returned, int) else 0
        except FedfleetError as e:
            code = e.exit_code
            err.write(f"error: {e}\n")
    return Result(code, out.getvalue(), err.getvalue())


class FileHost:
    """The aggregator's read, as every Host answers it, from files on this machine."""

    def read(self, path: str, offset: int = 0, limit: int | None = None) -> tuple[bytes, int]:
        p = Path(path)
        if not p.exists():
            return b"", -1
        data = p.read_bytes()
        return data[offset : offset + (limit or 1 << 20)], len(data)


def site_metrics(n: int, i: int) -> dict[str, float]:
    acc, f1, loss = SCORES[n]
    shift = 0.02 * (1 if i == 0 else -1)
    return {"loss": loss - shift, "accuracy": acc + shift, "f1": f1 + shift, "precision": f1, "recall": acc}


def events_and_models(server_out: Path, rounds: int = 3) -> tuple[list[dict[str, Any]], dict[int, Net]]:
    """What the built-in ServerApp writes for a run of `rounds` rounds: events and models."""
    (server_out / "models").mkdir(parents=True)
    nets: dict[int, Net] = {}
    t = 1000.0
    events: list[dict[str, Any]] = [{"event": "started", "time": t}]

    def save(n: int) -> dict[str, Any]:
        torch.manual_seed(n)
        nets[n] = Net(1, 10)
        torch.save(nets[n].state_dict(), server_out / "models" / f"round-{n}.pt")
        return {"event": "round-end", "time": t, "round": n, "model": f"models/round-{n}.pt"}

    def evaluated(n: int) -> dict[str, Any]:
        acc, f1, loss = SCORES[n]
        sites = [
            {"node": 11 + i, "participant": p, "vm": f"vm-{i}", "num-examples": 50, **site_metrics(n, i)}
            for i, p in enumerate(SITES)
        ]
        metrics = {"loss": loss, "accuracy": acc, "f1": f1, "precision": f1, "recall": acc}
        return {"event": "evaluated", "time": t, "round": n, "metrics": metrics, "sites": sites}

    events.append(save(0))
    for n in range(1, rounds + 1):
        t += 5
        events.append({"event": "round-start", "time": t, "round": n})
        events.append(evaluated(n - 1))
        train_sites = [
            {
                "node": 11 + i,
                "participant": p,
                "train-loss": 1.0 / n,
                "num-examples": 200,
                "train-seconds": 0.5,
            }
            for i, p in enumerate(SITES)
        ]
        events.append(
            {
                "event": "train-done",
                "time": t,
                "round": n,
                "metrics": {"train-loss": 1.0 / n},
                "sites": train_sites,
            }
        )
        t += 2.5
        if n == rounds:  # the last round's model is scored in its own evaluate phase, before it is saved
            events.append(evaluated(rounds))
        events.append(save(n))
    events.append({"event": "finished", "time": t + 1})
    return events, nets


def record_run(project: Path, run_id: str, rounds: int = 3, status: str = "completed") -> dict[str, Any]:
    stack = load_stack(project, "local")
    registry = registry_for(stack, project)
    server_out = project / "aggregator-out" / run_id
    events, nets = events_and_models(server_out, rounds)
    recorder = record.Recorder(
        registry, "local", run_id, kind=record.ModelKind(stack.app, None), aggregator=FileHost(),
        server_out=str(server_out), scratch=project / "scratch" / run_id,
    )  # fmt: skip
    recorder.start({"app.strategy": "fedavg"}, {"fedfleet.kind": "local"})
    for i in range(0, len(events), 3):  # in batches, as the follow loop hands them over
        recorder.events(events[i : i + 3])
    info = recorder.drain()
    run_dir = project / "runs" / run_id
    run_dir.mkdir(parents=True)
    summary = {"run_id": run_id, "status": status, "timings": {"total_seconds": 12.5}, "participants": []}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    recorder.close(summary, run_dir)
    return {"info": info, "events": events, "nets": nets, "registry": registry, "errors": recorder.errors}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with three recorded runs: two of 3 rounds, one of 2 that failed."""
    root = scratch_project(tmp_path_factory.mktemp("registry") / "project", None, "local", None)
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))  # MLflow must put nothing in the current directory
    try:
        runs = {rid: record_run(root, rid) for rid in ("20261201-100000-aaaa", "20261202-100000-bbbb")}
        runs["20261203-100000-cccc"] = record_run(root, "20261203-100000-cccc", rounds=2, status="failed")
        assert os.listdir(".") == []
    finally:
        os.chdir(cwd)
    root.joinpath("recorded.json").write_text(json.dumps({k: v["info"] for k, v in runs.items()}))
    return root


def test_a_runs_record_in_mlflow_matches_its_events_round_by_round(project: Path) -> None:
    import mlflow

    info = json.loads((project / "recorded.json").read_text())["20261201-100000-aaaa"]
    assert info["errors"] == [] and info["models_recorded"] == 4 and info["experiment"] == "local"
    store = registry_for(load_stack(project, "local"), project).store
    assert store.uri == f"sqlite:///{project.resolve()}/runs/registry/mlflow.db"
    client = mlflow.MlflowClient(store.uri)
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "20261201-100000-aaaa"
    assert client.get_experiment(run.info.experiment_id).name == "local"
    assert run.data.params["app.strategy"] == "fedavg" and run.data.tags["fedfleet.status"] == "completed"
    events, _ = events_and_models(project / "scratch-events", 3)
    for event in (e for e in events if e["event"] == "evaluated"):
        step = event["round"]
        for key, value in names.evaluation_metrics(event).items():
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert history[step] == pytest.approx(value), (key, step)
        for site in SITES:
            assert f"participant/{site}/accuracy" in run.data.metrics
    train = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/train-loss")}
    assert train == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "round_seconds")} == {
        1: 2.5, 2: 2.5, 3: 2.5,
    }  # fmt: skip
    assert run.data.metrics["time/total_seconds"] == 12.5
    # Every round's model is an MLflow model of the run, in the stack's experiment, stored
    # under the project's artifact folder; the metrics of its round point at it.
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    mine = {m.tags["fedfleet.round"]: m for m in models if m.source_run_id == run.info.run_id}
    assert sorted(mine) == ["0", "1", "2", "3"]
    for m in mine.values():
        assert m.artifact_location.startswith(
            (project / "runs" / "registry" / "artifacts").resolve().as_uri()
        )
    for k, m in mine.items():
        linked = {x.key: x.value for x in m.metrics or [] if x.step == int(k)}
        assert linked["accuracy"] == pytest.approx(SCORES[int(k)][0])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]
    failed = json.loads((project / "recorded.json").read_text())["20261203-100000-cccc"]
    assert client.get_run(failed["mlflow_run_id"]).info.status == "FAILED"


def test_models_list_shows_every_run_and_round_newest_first(project: Path) -> None:
    listed = fedfleet(project, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    assert [r["run"] for r in runs] == [
        "20261203-100000-cccc",
        "20261202-100000-bbbb",
        "20261201-100000-aaaa",
    ]
    one = cli(project, "models", "list", "--run", "20261202", "--json")
    (run,) = json.loads(one.stdout)
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2, 3]
    for r in run["rounds"]:
        acc, _, loss = SCORES[r["round"]]
        assert r["metrics"]["accuracy"] == pytest.approx(acc) and r["metrics"]["loss"] == pytest.approx(loss)
        assert r["model"].startswith("m-")
    table = cli(project, "models", "list", "--run", "20261202-100000-bbbb")
    assert "81.0%" in table.stdout and "0.520" in table.stdout
    unknown = cli(project, "models", "list", "--run", "20261299")
    assert unknown.returncode == 2 and "no run '20261299'" in unknown.stderr


def test_best_honours_each_criterion_and_says_when_none_qualifies(project: Path) -> None:
    by_accuracy = json.loads(cli(project, "models", "best", "--json").stdout)
    # Round 2 of every run ties on accuracy (0.81) and loss: the latest run wins (a failed run's
    # completed rounds are models like any other).
    assert (by_accuracy["run"], by_accuracy["round"]) == ("20261203-100000-cccc", 2)
    by_f1 = json.loads(cli(project, "models", "best", "--metric", "f1", "--json").stdout)
    assert by_f1["round"] == 3 and by_f1["metrics"]["f1"] == pytest.approx(0.77)
    assert by_f1["registered"]["uri"] == "models:/fedfleet-local@best"
    bounded = fedfleet(
        project, "models", "best", "--metric", "f1", "--max", "loss=0.5", "--min", "accuracy=0.6", "--json"
    )
    assert json.loads(bounded.stdout)["round"] == 3
    capped = json.loads(
        fedfleet(
            project, "models", "best", "--metric", "f1", "--max", "loss=0.51", "--run", "20261203", "--json"
        ).stdout
    )
    assert "no round meets" in capped["reason"]  # the 2-round run never reached loss 0.51
    assert capped["closest"]["round"] == 2 and capped["unmet"] == ["loss <= 0.51"]
    none = fedfleet(project, "models", "best", "--min", "accuracy=0.95", "--max", "loss=0.3")
    assert none.returncode == 1 and "none qualifies" in none.stdout
    assert "no round meets accuracy >= 0.95 nor loss <= 0.3" in " ".join(none.stdout.split())
    # The registered model's alias follows the latest choice.
    cli(project, "models", "best", "--metric", "loss", "--json")
    got = record.resolve_model(registry_for(load_stack(project, "local"), project), "local", "best")
    assert (got.run, got.round) == ("20261202-100000-bbbb", 3)
    for bad, says in [
        (["--metric", "acuracy"], "unknown metric 'acuracy'; did you mean 'accuracy'?"),
        (["--min", "accuracy"], "--min 'accuracy': expected METRIC=NUMBER"),
        (["--max", "loss=low"], "'low' is not a number"),
        (["--min", "accuracy=nan"], "must be a finite number"),
    ]:
        out = cli(project, "models", "best", *bad)
        assert out.returncode == 2 and says in " ".join(out.stderr.split()), out.stderr


def test_a_downloaded_model_loads_with_plain_pytorch_and_with_mlflow(project: Path, tmp_path: Path) -> None:
    import mlflow.pytorch

    _, nets = events_and_models(tmp_path / "expected", 3)
    out = fedfleet(
        project, "models", "download", "20261201-100000-aaaa:2", "-o", str(tmp_path / "m"), "--json"
    )
    assert out.returncode == 0, out.stderr
    about = json.loads(out.stdout)
    assert (about["run"], about["round"], about["classes"]) == ("20261201-100000-aaaa", 2, list("0123456789"))
    assert about["metrics"]["accuracy"] == pytest.approx(0.81)
    x = torch.rand(4, 1, 8, 8)
    expected = nets[2](x)
    via_mlflow = mlflow.pytorch.load_model(str(tmp_path / "m" / "mlflow-model"))
    assert torch.allclose(via_mlflow(x), expected)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "mlflow-model",
        "model.json",
        "state_dict.pt",
        "task.py",
    ]
    # Plain PyTorch, in a process of its own, from the downloaded files (the snippet model.json gives).
    script = (
        "import sys, torch; sys.path.insert(0, '.'); "
        + about["load"]["pytorch"]
        + "; torch.manual_seed(7); print(net(torch.rand(4, 1, 8, 8)).sum().item())"
    )
    plain = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path / "m", capture_output=True, text=True, check=False
    )
    assert plain.returncode == 0, plain.stderr
    torch.manual_seed(7)
    assert float(plain.stdout) == pytest.approx(nets[2](torch.rand(4, 1, 8, 8)).sum().item(), rel=1e-5)
    # `best` alone: the stack's registered best; a run alone: its last round.
    cli(project, "models", "best", "--metric", "f1")
    best = json.loads(
        fedfleet(
            project, "models", "download", "best", "--stack", "local", "-o", str(tmp_path / "b"), "--json"
        ).stdout
    )
    assert best["round"] == 3
    last = json.loads(
        cli(project, "models", "download", "20261203", "-o", str(tmp_path / "l"), "--json").stdout
    )
    assert (last["run"], last["round"]) == ("20261203-100000-cccc", 2)


def test_unknown_runs_rounds_and_targets_are_named(project: Path, tmp_path: Path) -> None:
    for spec, says in [
        ("20261201-100000-aaab:1", "no run '20261201-100000-aaab'"),
        ("2026120", "ambiguous"),
        ("20261201-100000-aaaa:9", "has no round 9; its rounds: 0, 1, 2, 3"),
        ("20261201-100000-aaaa:last", "'last' is not a round"),
    ]:
        out = cli(project, "models", "download", spec, "-o", str(tmp_path / "x"))
        assert out.returncode == 2 and says in " ".join(out.stderr.split()), out.stderr
        assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    out = cli(project, "models", "download", "20261201-100000-aaaa", "-o", str(tmp_path / "full"))
    assert out.returncode == 2 and "is not empty" in out.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_registry_settings_are_checked(make_project) -> None:
    for registry, says in [
        ({"trackingUri": "localhost:5000"}, "is not a tracking URI MLflow takes"),
        ({"trackinguri": "http://x"}, "did you mean 'trackingUri'?"),
        ({"record": "yes"}, "must be true or false"),
    ]:
        project = make_project(local_config() | {"fedfleet:registry": registry})
        with pytest.raises(ConfigError, match="fedfleet:registry") as err:
            load_stack(project, "local")
        assert says in str(err.value)
        shutil.rmtree(project)
    project = make_project(
        local_config() | {"fedfleet:registry": {"trackingUri": "http://127.0.0.1:5999", "record": False}}
    )
    assert load_stack(project, "local").registry.record is False


def test_an_unreachable_tracking_server_is_named_with_the_fix(make_project) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    uri = f"http://alice:s3cret@127.0.0.1:{port}"  # the password must never be shown
    project = make_project(local_config() | {"fedfleet:registry": {"trackingUri": uri}})
    started = time.monotonic()
    out = cli(project, "models", "list", "--stack", "local")
    assert out.returncode == 1
    message = " ".join(out.stderr.split())
    assert f"the model registry at http://127.0.0.1:{port}" in message
    assert "fedfleet:registry.trackingUri" in message and "does not answer" in message
    assert "s3cret" not in out.stderr + out.stdout
    assert time.monotonic() - started < 60
    # A run stops there too, before any host is configured: no run directory, no SuperLink.
    run = fedfleet(project, "run", "--rounds", "1", timeout=120)
    assert run.returncode == 1 and "does not answer" in run.stderr and "s3cret" not in run.stderr + run.stdout
    assert not (project / "runs").exists() or list((project / "runs").iterdir()) == []
    assert running_processes_mentioning(str(project)) == []


def test_the_store_shown_never_carries_a_password() -> None:
    store = store_mod.Store("https://alice:s3cret@mlflow.example.org:8443/path", "x")
    assert store.shown == "https://mlflow.example.org:8443/path"


def test_criteria_pick_rounds_by_metric_and_bounds() -> None:
    pool = [
        Candidate("r1", 1, {"accuracy": 0.80, "f1": 0.70, "loss": 0.6}, "m1"),
        Candidate("r1", 2, {"accuracy": 0.90, "f1": 0.60, "loss": 0.4}, "m2"),
        Candidate("r2", 1, {"accuracy": 0.90, "f1": 0.65, "loss": 0.3}, "m3"),
        Candidate("r2", 2, {"accuracy": math.nan, "f1": 0.95, "loss": 0.2}, "m4"),
    ]
    assert names.choose(pool, criteria("accuracy")).winner == pool[2]  # the tie goes to the lower loss
    assert names.choose(pool, criteria("loss")).winner == pool[3]
    assert names.choose(pool, criteria("f1", ["accuracy=0.85"])).winner == pool[2]  # NaN never qualifies
    choice = names.choose(pool, criteria("f1", ["accuracy=0.95"], ["loss=0.35"]))
    assert choice.winner is None and choice.unmet == ["accuracy >= 0.95"]
    assert choice.per_bound == {"accuracy >= 0.95": 0, "loss <= 0.35": 2}
    assert choice.closest == pool[2]
    assert "closest: r2:1 (accuracy 0.9000 vs accuracy >= 0.95)" in choice.reason()
    with pytest.raises(ConfigError, match="did you mean 'accuracy'"):
        names.choose(pool, criteria("accurcy"))
    with pytest.raises(ConfigError, match=r"unknown metric 'auc'; known: accuracy, f1, loss$"):
        names.choose(pool, criteria("f1", ["auc=0.3"]))
    with pytest.raises(ConfigError, match="expected METRIC=NUMBER"):
        criteria("f1", ["=0.3"])


def test_mlflow_metric_names_from_events() -> None:
    event = {
        "metrics": {"loss": 0.5, "accuracy": 0.8},
        "sites": [
            {"node": 1, "participant": "h a", "vm": "v", "num-examples": 9, "accuracy": 0.7, "flag": True}
        ],
    }
    assert names.evaluation_metrics(event) == {"loss": 0.5, "accuracy": 0.8, "participant/h a/accuracy": 0.7}
    assert names.metric_key("server", "acc@1") == "server/acc_1"
    assert names.flat_params("app", {"a": 1, "b": {"c": "x"}, "d": None}) == {"app.a": "1", "app.b.c": "x"}


@pytest.fixture(scope="module")
def ui(project: Path) -> Iterator[str]:
    """`fedfleet ui` on the project's store; stopped (and nothing of it left) at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedfleet", "--project", str(project), "ui", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert f"http://127.0.0.1:{port}" in line, (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        assert running_processes_mentioning(str(project / "runs" / "registry")) == []


def test_the_ui_serves_the_registry_on_loopback_only(ui: str) -> None:
    request = urllib.request.Request(
        f"{ui}/api/2.0/mlflow/runs/search",
        data=json.dumps({"experiment_ids": ["1"], "max_results": 10}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        runs = json.loads(reply.read())["runs"]
    assert {r["info"]["run_name"] for r in runs} >= {"20261201-100000-aaaa", "20261202-100000-bbbb"}
    with urllib.request.urlopen(f"{ui}/", timeout=30) as page:
        assert b"MLflow" in page.read()
    port = ui.rsplit(":", 1)[1]
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    addresses = [line.split()[3] for line in out.splitlines() if line.strip()]
    assert addresses and all(a.startswith("127.0.0.1:") for a in addresses), addresses


BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on this machine")
def test_the_ui_draws_the_runs_in_a_browser(ui: str, tmp_path: Path) -> None:
    assert BROWSER is not None
    shot = tmp_path / "ui.png"
    subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1280,800",
         "--virtual-time-budget=10000", f"{ui}/#/experiments/1"],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert shot.exists() and shot.stat().st_size > 10_000
