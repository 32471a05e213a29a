"""End to end through real Flower processes: flower-superlink, flower-supernode, flwr run.

Each test uses its own project directory, stack and free ports, and checks that
no process whose command line mentions that directory is left when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfleet.adapters import netns as localnet
from fedfleet.adapters.processes import tree
from fedfleet.core.paths import stack_paths
from fedfleet.core.stack import load_stack
from fedfleet.sandbox import free_ports, local_config
from fedfleet.stages import configure, provision

from .conftest import running_processes_mentioning, why_no_namespaces
from .controlapi import assert_participant_refused, participant_attempts
from .test_cli_errors import earlier_run, fedfleet

pytestmark = pytest.mark.e2e


def start_run(project: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedfleet", "--project", str(project), "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"fedfleet exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def server_events(project: Path) -> list[dict]:
    found = sorted((project / ".fedfleet" / "local" / "aggregator" / "runs").glob("*/events.jsonl"))
    if not found:
        return []
    return [json.loads(line) for line in found[-1].read_text().splitlines() if line.strip()]


MLP = """# A network of the user's own (not fedfleet's CNN): one hidden layer.
import os
import sys

from torch import nn


def build(num_classes: int, channels: int, image_size: int) -> nn.Module:
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * image_size * image_size, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )
    if "/eu-vm-" in " ".join([*sys.argv, os.environ.get("FLWR_HOME", "")]):
        # The test's poisoned participant: on hospital-eu's VMs (their worker's key file, their
        # SuperNode's home) training turns every weight into NaN, as a tampered copy could.
        net.register_forward_hook(lambda m, inputs, out: out * float("nan") if m.training else out)
    return net
"""


def rebuild(models: Path, state_file: Path) -> torch.nn.Module:
    """The saved model, rebuilt from the run's models/ directory alone (as the README says)."""
    import importlib.util

    about = json.loads((models / "model.json").read_text())
    factory = about["factory"]
    spec = importlib.util.spec_from_file_location("saved_model", models / factory["file"])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = getattr(module, factory["function"])(**factory["kwargs"])
    net.load_state_dict(torch.load(state_file, weights_only=True))
    return net


def test_init_then_configure_then_two_rounds_with_your_own_model(make_project, tmp_path: Path):
    """The whole path a user takes, with a model of their own; one participant's copy of it is
    poisoned (NaN weights after training): its updates are rejected, named, and the rounds
    complete with the other two, the model improving."""
    project = make_project()
    (project / "models").mkdir()
    (project / "models" / "mlp.py").write_text(MLP)
    init = fedfleet(
        project, "init", "lab", "--participant", "hospital-us@aws:us-east-1",
        "--participant", "hospital-asia@gcp:asia-northeast3", "--participant", "hospital-eu@azure:westeurope",
        "--model", "models/mlp.py:build", "--rounds", "2", "--json",
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    assert json.loads(init.stdout)["path"] == str(project / "stacks" / "Pulumi.lab.yaml")
    configured = fedfleet(project, "configure", "--stack", "lab", "--json", timeout=300)
    assert configured.returncode == 0, configured.stderr
    assert json.loads(configured.stdout)["changed"] > 0
    proc = None
    try:
        check_control_api_closed_to_participants(project, "lab", tmp_path)
        # Those SuperNodes connected during `configure`: the run's play leaves them as they
        # are and the run accepts them (it does not wait for a new connection).
        proc = start_run(project, "--stack", "lab", "--json")
        out, err = proc.communicate(timeout=600)
    finally:  # what `configure` started, whatever happened since (a run stops it on its own)
        if proc is not None and proc.poll() is None:  # the test failed first: the run lets go
            proc.terminate()  # of the stack's lock as it stops
            proc.wait(120)
        stopped = fedfleet(project, "stop", "--stack", "lab", timeout=120)
    assert proc.returncode == 0, err
    assert stopped.returncode == 0, stopped.stderr
    summary = json.loads(out)
    run_dir = project / "runs" / summary["run_id"]
    assert json.loads((run_dir / "summary.json").read_text()) == summary

    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["model"] == {"model": "models/mlp.py:build", "class": "Sequential", "parameters": 4810}
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert set(rounds) == {0, 1, 2}
    # The model learns with one site poisoned (10.0 % -> 59.2 % in the run the README quotes).
    assert rounds[2]["metrics"]["accuracy"] > rounds[0]["metrics"]["accuracy"] + 0.15
    for r in rounds.values():
        assert set(r["metrics"]) == {"loss", "accuracy", "f1", "precision", "recall"}
    # One SuperNode per participant, on one of its own VMs, all computing on the VM's worker
    # (which loaded the stack's model from the copy that came with the app).
    served = {p["name"]: p["vm"] for p in summary["participants"]}
    assert served == {"hospital-us": "us-vm-1", "hospital-asia": "asia-vm-1", "hospital-eu": "eu-vm-1"}
    # Chosen after a probe, with the rest of each participant's VMs as the failover order.
    assert all(p["failover_order"] == [p["vm"].replace("-1", "-2")] for p in summary["participants"])
    for r in (1, 2):
        # hospital-eu's update (NaN) is rejected and named; the round aggregates the other two.
        (poisoned,) = rounds[r]["rejected"]
        assert poisoned["participant"] == "hospital-eu" and poisoned["vm"] == "eu-vm-1", poisoned
        assert poisoned["reason"].startswith("NaN or Inf in "), poisoned
        sites = rounds[r]["sites"]["train"]
        assert sorted(s["participant"] for s in sites) == ["hospital-asia", "hospital-us"]
        assert {s["compute"] for s in sites} == {"worker"}
    assert "rejected" not in rounds[0]
    # Every round's global model is saved; the models directory alone rebuilds the network.
    models = run_dir / "models"
    for r in (0, 1, 2):
        net = rebuild(models, run_dir / rounds[r]["model"])
        assert isinstance(net, torch.nn.Sequential)
        assert all(torch.isfinite(p).all() for p in net.parameters()), f"round {r}'s model"
    assert summary["best_round"]["round"] in (1, 2)
    # The run planned the aggregator first (emulated here) and recorded the choice.
    planned = summary["aggregator"]["planned"]
    assert planned["cloud"] in ("aws", "gcp", "azure") and planned["max_rtt_ms"] <= 250
    assert (
        summary["timings"]["round_mean_seconds"] > summary["timings"]["round_mean_client_compute_seconds"] > 0
    )
    # Flower runs through the playbook, on each host, with nothing failed; as `configure`
    # had started it, the run's play changed nothing and each SuperNode was tried once.
    play = summary["configure"]
    assert play["playbook"] == "site.yml" and play["problems"] == []
    assert set(play["hosts"]) == {"aggregator", *served.values()}
    assert all(h.get("failures", 0) == 0 and h["ok"] > 0 for h in play["hosts"].values())
    assert play["changed"] == 0
    tried = summary["orchestration"]["tried"]
    assert {p: [a["vm"] for a in attempts] for p, attempts in tried.items()} == {
        "hospital-us": ["us-vm-1"], "hospital-asia": ["asia-vm-1"], "hospital-eu": ["eu-vm-1"],
    }  # fmt: skip
    assert summary["stop"]["seconds"] > 0
    assert running_processes_mentioning(str(project)) == []
    check_registry(project, summary, tmp_path)
    check_no_key_leaves_its_file(project)


def check_control_api_closed_to_participants(project: Path, stack_name: str, tmp_path: Path) -> None:
    """With what every participant VM holds (the CA certificate, the SuperLink's address), the
    proxy answers the Fleet API only: `flwr ls`, `flwr run`, the Control API, the ServerApp
    runtime and the API docs are refused; the operator, on the SuperLink's own loopback port, is
    served (`flwr ls` here; its `flwr run` is the whole run that follows)."""
    import ssl
    import urllib.error
    import urllib.request

    from fedfleet.adapters.flwr import FlwrCli
    from fedfleet.core.paths import stack_paths
    from fedfleet.core.stack import load_stack

    stack = load_stack(project, stack_name)
    paths = stack_paths(stack, project)
    context = ssl.create_default_context(cafile=str(paths.pki / "ca.crt"))

    def answer(port: int, path: str, method: str = "POST") -> int:
        request = urllib.request.Request(
            f"https://127.0.0.1:{port}{path}", data=b"" if method == "POST" else None, method=method,
            headers={"content-type": "application/protobuf"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    public, internal = stack.aggregator.port, stack.aggregator.internal_port
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/list-nodes",
                 "/v1/runtime/acquire-task", "/v1/runtime/pull-app-inputs", "/docs", "/openapi.json",
                 "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs"):  # fmt: skip
        assert answer(public, path) == 403, path
    assert answer(public, "/health", "GET") == 200
    assert answer(public, "/v1/fleet/get-run") == 401  # the SuperLink itself: no node signature
    assert answer(internal, "/v1/control/list-runs") == 200
    # `flwr ls` and `flwr run` as a participant would type them: refused. (On this stack
    # every emulated host shares one loopback, so the SuperLink's own port cannot be closed
    # to them: the namespaces and SSH tests check that it is.)
    seen = participant_attempts("127.0.0.1", public, paths.pki / "ca.crt", tmp_path)
    assert_participant_refused(seen, internal_closed=False)
    check_bad_supernodes_are_refused(public, paths.pki / "ca.crt", tmp_path)
    operator = FlwrCli(
        paths.operator_home, configure.connection_name(stack), f"127.0.0.1:{internal}", paths.pki / "ca.crt"
    )
    listed = operator.call("ls")
    assert listed.get("success"), "the operator's flwr is served on the SuperLink's own port"
    assert listed["runs"] == [], f"a participant's `flwr run` created a run: {listed['runs']}"


def check_bad_supernodes_are_refused(port: int, ca: Path, tmp_path: Path) -> None:
    """Through the proxy, a SuperNode with an unregistered key, one that trusts another CA and a
    plain-text one are each refused at once, saying why; none leaves a process behind."""
    from fedfleet.adapters.pki import ensure_server_tls

    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True)
    other_ca = ensure_server_tls(tmp_path / "other-pki", ["127.0.0.1"], "other").ca_cert
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FLWR_HOME": str(tmp_path / "stranger-home"),
    }
    cases = {
        "[code: 2004] Failed to activate SuperNode": ["--root-certificates", str(ca)],
        "CERTIFICATE_VERIFY_FAILED": ["--root-certificates", str(other_ca)],
        "Exit Code: 303": ["--insecure"],
    }
    for said, flags in cases.items():
        (runtime,) = free_ports(1)
        log = tmp_path / f"stranger-{runtime}.log"
        with log.open("w") as sink:  # a file, not a pipe: its SuperExec child would hold a pipe open
            proc = subprocess.Popen(
                [str(bin_dir / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--port", str(runtime),
                 "--auth-supernode-private-key", str(key), *flags],
                stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
            try:
                proc.wait(timeout=60)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its SuperExec child too
        out = log.read_text()
        assert proc.returncode != 0 and said in out, (flags, out[-1500:])


def check_no_key_leaves_its_file(project: Path) -> None:
    """Every private key a run made (CA, SuperLink, each SuperNode's, workers') is in its own
    owner-only file, and no log, run artifact, Ansible artifact or other file holds any of it."""
    files = [p for p in project.rglob("*") if p.is_file() and not p.is_symlink()]
    texts = {p: p.read_bytes() for p in files if p.stat().st_size < 50_000_000}
    keys = {p: t for p, t in texts.items() if b"PRIVATE KEY-----" in t}
    assert any(p.name == "ca.key" for p in keys) and len(keys) >= 5, sorted(
        map(str, keys)
    )  # CA, SuperLink, 3 nodes
    for path in keys:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    lines = {
        line for t in keys.values() for line in t.splitlines() if len(line) >= 40 and b"-----" not in line
    }
    for path, text in texts.items():
        if path in keys:
            continue
        leaked = [line[:12] for line in lines if line in text]
        assert not leaked, f"{path} holds private key material"


def check_registry(project: Path, summary: dict, tmp_path: Path) -> None:
    """The run's MLflow record matches summary.json round by round; its best model, downloaded,
    loads with plain PyTorch and with MLflow and scores what was recorded on each site's test split."""
    import mlflow
    import mlflow.pytorch
    from fedfleet_app.data import load_site

    from fedfleet.core.paths import data_path
    from fedfleet.workflow import registry_for

    stack = load_stack(project, "lab")
    assert summary["registry"]["errors"] == [] and summary["registry"]["models_recorded"] == 3
    client = mlflow.MlflowClient(registry_for(stack, project).store.uri)
    run = client.get_run(summary["registry"]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["fedfleet.run_id"] == summary["run_id"]
    assert (
        run.data.params["app.num-server-rounds"] == "2"
        and run.data.params["model.model"] == "models/mlp.py:build"
    )
    assert run.data.tags["fedfleet.fab_hash"] == summary["flower_status"]["fab-hash"]
    for r in summary["rounds"]:
        for key, value in r["metrics"].items():
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert history[r["round"]] == pytest.approx(value), (key, r["round"])
        for site in r["sites"]["evaluate"] or []:
            history = client.get_metric_history(
                run.info.run_id, f"participant/{site['participant']}/accuracy"
            )
            assert {m.step: m.value for m in history}[r["round"]] == pytest.approx(site["accuracy"])
    rejected = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "rejected_updates")}
    assert rejected == {r["round"]: len(r["rejected"]) for r in summary["rounds"] if r.get("rejected")}
    best = summary["best_round"]["round"]
    out = fedfleet(
        project, "models", "download", f"{summary['run_id']}:best", "-o", str(tmp_path / "best"), "--json"
    )
    assert out.returncode == 0, out.stderr
    about = json.loads(out.stdout)
    assert about["round"] == best and about["source"] == "mlp.py"
    plain = rebuild_plain(tmp_path / "best", about)
    via_mlflow = mlflow.pytorch.load_model(str(tmp_path / "best" / "mlflow-model"))
    recorded = {r["round"]: r for r in summary["rounds"]}[best]
    correct = total = 0
    for p in stack.participants:
        _, test = load_site(data_path(stack, project, p.name), stack.app.data_spec)
        with torch.no_grad():
            x = torch.from_numpy(test.x)
            assert torch.allclose(plain(x), via_mlflow(x))
            hits = int((plain(x).argmax(1).numpy() == test.y).sum())
        site = next(s for s in recorded["sites"]["evaluate"] or [] if s["participant"] == p.name)
        assert hits / len(test) == pytest.approx(site["accuracy"])
        correct, total = correct + hits, total + len(test)
    assert correct / total == pytest.approx(recorded["metrics"]["accuracy"])


def rebuild_plain(directory: Path, about: dict) -> torch.nn.Module:
    """A downloaded model as plain PyTorch rebuilds it: the source file, then the state_dict."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("downloaded", directory / about["source"])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.build(
        num_classes=about["num_classes"], channels=about["channels"], image_size=about["image_size"]
    )
    net.load_state_dict(torch.load(directory / about["state_dict"], weights_only=True))
    return net.eval()


def kill_vm(project: Path, vm: str) -> None:
    """The VM dies: its supervisor and everything under it are killed from outside."""
    pidfile = project / ".fedfleet" / "local" / "vms" / vm / "supervisor" / "supervisord.pid"
    for pid in tree([int(pidfile.read_text())]):
        os.kill(pid, signal.SIGKILL)


def started_round(project: Path, n: int) -> bool:
    return any(e["event"] == "round-start" and e["round"] == n for e in server_events(project))


def test_lost_vms_are_replaced_and_the_run_completes(make_project):
    ports = free_ports(7)  # the aggregator, then us-vm-1, us-vm-2, asia-vm-1, asia-vm-2, eu-vm-1, eu-vm-2
    project = make_project(local_config(ports=ports))  # two VMs per participant
    with socket.socket() as squatter:  # eu-vm-1's SuperNode port is taken: eu-vm-2 serves
        squatter.bind(("127.0.0.1", ports[5]))
        squatter.listen()
        proc = start_run(project, "--rounds", "3", "--json")
        # Round 1: hospital-asia's serving VM dies (its supervisor, SuperNode and worker).
        wait_until(lambda: started_round(project, 1), 300, "round 1", proc)
        killed_at = time.time()
        kill_vm(project, "asia-vm-1")
        # Round 2: only hospital-us's SuperNode process dies (its supervisor restarts it).
        wait_until(lambda: started_round(project, 2), 300, "round 2", proc)
        (supernode,) = [
            int(line.split(":")[0])
            for line in running_processes_mentioning(str(project / ".fedfleet" / "local" / "vms" / "us-vm-1"))
            if "bin/flower-supernode" in line
        ]
        os.kill(supernode, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    # At start: the taken port is named and the participant's next VM serves.
    taken, eu_next = summary["orchestration"]["tried"]["hospital-eu"]
    assert taken["vm"] == "eu-vm-1" and f"port {ports[5]} on eu-vm-1 is already in use" in taken["error"]
    assert eu_next == {**eu_next, "vm": "eu-vm-2", "error": ""}
    # During the run: both losses noticed and replaced.
    vm_lost, process_lost = summary["orchestration"]["failovers"]
    assert vm_lost["participant"] == "hospital-asia" and vm_lost["lost_vm"] == "asia-vm-1"
    assert "the supervisor of asia-vm-1 (hospital-asia) does not answer" in vm_lost["why"]
    assert vm_lost["replacement"] == "asia-vm-2" and vm_lost["node_id"] is not None
    assert process_lost["lost_vm"] == "us-vm-1" and process_lost["replacement"] == "us-vm-2"
    assert "exited and was restarted" in process_lost["why"]
    # Noticed far sooner than Flower's heartbeat (60 s), replaced while the run went on.
    detected = vm_lost["detected_at"] - killed_at
    recovered = vm_lost["replacement_online_at"] - killed_at
    print(f"killed asia-vm-1: detected after {detected:.1f} s, replacement online after {recovered:.1f} s")
    assert 0 <= detected < 10 and recovered < 60
    print(
        f"killed us-vm-1's SuperNode: replacement online {process_lost['replacement_seconds']:.1f} s after it was noticed"
    )
    rounds = {r["round"]: r for r in summary["rounds"]}
    # Each round went on without the lost node; the participant is back in the next round.
    served = {r: {s["participant"]: s["vm"] for s in rounds[r]["sites"]["train"]} for r in rounds if r}
    assert served[1] == {"hospital-us": "us-vm-1", "hospital-eu": "eu-vm-2"}
    assert served[2] == {"hospital-asia": "asia-vm-2", "hospital-eu": "eu-vm-2"}
    assert served[3] == {"hospital-us": "us-vm-2", "hospital-asia": "asia-vm-2", "hospital-eu": "eu-vm-2"}
    lost = [(e["round"], str(e["node"])) for e in summary["errors"]]
    assert lost == [(1, vm_lost["node_id"]), (2, process_lost["node_id"])]
    assert set(rounds[3]["metrics"]) == {"loss", "accuracy", "f1", "precision", "recall"}
    run_dir = project / "runs" / summary["run_id"]
    assert (run_dir / "logs" / "asia-vm-2-flower-supernode.log").stat().st_size > 0
    # The next run starts after the VMs that served last.
    rotation = json.loads((project / ".fedfleet" / "local" / "rotation.json").read_text())
    assert rotation["positions"] == {"hospital-us": 0, "hospital-asia": 0, "hospital-eu": 0}
    assert running_processes_mentioning(str(project)) == []


def test_a_vm_whose_network_link_is_cut_is_replaced(make_project, tmp_path: Path):
    if why := why_no_namespaces():
        pytest.skip(f"network namespaces: {why}")
    config = local_config()  # two VMs per participant, each in its own network namespace
    config["fedfleet:local"] |= {
        "network": "namespaces",
        "subnet": f"10.231.{secrets.randbelow(200) + 20}.0/24",
    }
    project = make_project(config)
    stack = load_stack(project, "local")
    net = provision.network(stack, project)
    assert net is not None
    proc = start_run(project, "--rounds", "2", "--json")
    try:
        wait_until(lambda: started_round(project, 1), 300, "round 1", proc)
        # asia-vm-1's SuperNode runs in that VM's namespace: the SuperLink is reachable
        # from there only over the VM's link, which is now cut (the VM itself runs on).
        home = str(project / ".fedfleet" / "local" / "vms" / "asia-vm-1")
        (supernode,) = [
            int(line.split(":")[0])
            for line in running_processes_mentioning(home)
            if "bin/flower-supernode" in line
        ]
        where = subprocess.run(
            ["ip", "netns", "identify", str(supernode)], capture_output=True, text=True, check=False
        )
        assert where.stdout.strip() == net.namespace("asia-vm-1")
        cut_at = time.time()
        localnet.set_link(net, "asia-vm-1", up=False)
        # Meanwhile, from another participant VM's namespace, with its CA certificate: the
        # SuperLink's address serves the Fleet API only; its own port is not reachable at all.
        # (`flwr ls` only: `flwr run` is refused the same way on the loopback stack, and its FAB
        # build would compete with the failover for this machine's two cores.)
        seen = participant_attempts(
            net.gateway, stack.aggregator.port, stack_paths(stack, project).pki / "ca.crt", tmp_path,
            inside=("ip", "netns", "exec", net.namespace("us-vm-2")), internal=stack.aggregator.internal_port,
            commands=("flwr ls",),
        )  # fmt: skip
        out, err = proc.communicate(timeout=600)
        # What the run left of its network (checked before this test's own clean-up).
        left = (
            localnet.namespaces_left([net.tag]) + [net.bridge] * Path("/sys/class/net", net.bridge).exists()
        )
    finally:
        if proc.poll() is None:  # the test failed first: let the run stop what it started
            proc.terminate()
            proc.wait(120)
        provision.down_network(load_stack(project, "local"), project)
    assert proc.returncode == 0, err
    assert_participant_refused(seen, internal_closed=True)
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    (cut,) = summary["orchestration"]["failovers"]
    assert cut["lost_vm"] == "asia-vm-1" and cut["replacement"] == "asia-vm-2"
    assert (
        f"asia-vm-1 (hospital-asia) does not answer over its network link ({net.vms['asia-vm-1']}"
        in cut["why"]
    )
    detected = cut["detected_at"] - cut_at
    recovered = cut["replacement_online_at"] - cut_at
    print(
        f"cut asia-vm-1's link: detected after {detected:.1f} s, replacement online after {recovered:.1f} s"
    )
    assert 0 <= detected < 10 and recovered < 60  # Flower's heartbeat alone: up to 60 s to notice
    served = {r["round"]: {s["vm"] for s in r["sites"]["train"]} for r in summary["rounds"] if r["round"]}
    assert served[1] == {"us-vm-1", "eu-vm-1"} and served[2] == {"us-vm-1", "asia-vm-2", "eu-vm-1"}
    assert [(e["round"], str(e["node"])) for e in summary["errors"]] == [(1, cut["node_id"])]
    # The run removed the VMs' namespaces and bridge, and left no process.
    assert left == []
    assert running_processes_mentioning(str(project)) == []


def test_failed_run_stops_everything_and_keeps_earlier_results(make_project):
    # One VM per participant and every participant required: a lost VM cannot be replaced.
    config = local_config(vms_per_participant=1)
    config["fedfleet:app"]["min-participants"] = 3
    project = make_project(config)
    before = earlier_run(project)
    proc = start_run(project, "--rounds", "3")
    wait_until(lambda: started_round(project, 1), 300, "round 1", proc)
    kill_vm(project, "asia-vm-1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    assert "the supervisor of asia-vm-1 (hospital-asia) does not answer" in err
    assert "no VM left to take over" in err and "fewer than min-participants=3" in err
    assert running_processes_mentioning(str(project)) == []
    run, content = before
    assert (run / "summary.json").read_bytes() == content
    failed = [p for p in (project / "runs").glob("2*") if p != run]  # runs/registry is the model registry
    assert len(failed) == 1
    summary = json.loads((failed[0] / "summary.json").read_text())
    assert summary["status"] == "failed" and "asia-vm-1" in summary["error"]
    # The service logs of every host are kept with the run.
    assert (failed[0] / "logs" / "aggregator-flower-superlink.log").stat().st_size > 0


def test_ctrl_c_stops_everything(make_project):
    project = make_project()
    proc = start_run(project, "--rounds", "1")
    wait_until(
        lambda: any(e["event"] == "started" for e in server_events(project)), 240, "the ServerApp", proc
    )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert running_processes_mentioning(str(project)) == []
    (run,) = (project / "runs").glob("2*")
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"


FIXTURE_APP = Path(__file__).parent / "fixtures" / "numpy-app"


def test_a_flower_app_of_your_own_runs_unchanged_with_its_own_dependency(make_project, tmp_path: Path):
    """A Flower app written as Flower's examples are (its own pyproject.toml, a dependency
    fedfleet does not have, no fedfleet import): two rounds on the local stack, its metrics
    from Flower's own log lines, its files collected, its directory untouched, nothing left."""
    import importlib.util
    import shutil

    assert importlib.util.find_spec("tabulate") is None, "the app's dependency must not be fedfleet's"
    app = tmp_path / "my-flower-app"
    shutil.copytree(FIXTURE_APP, app)
    pyproject = (app / "pyproject.toml").read_bytes()
    config = local_config(vms_per_participant=1)
    config["fedfleet:participants"] = config["fedfleet:participants"][:2]
    config["fedfleet:app"] = {
        "path": str(app),
        "config": {"local-steps": 10},
        "nodeConfig": {"site-tag": "x"},
    }
    project = make_project(config)
    proc = start_run(project, "--rounds", "2", "--json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    run_dir = project / "runs" / summary["run_id"]
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["flower_status"]["status"] == "finished:completed"
    assert summary["app"]["app"] == "fedfleet-tests/numpy-app" and summary["app"]["metrics_reported"]
    # The overrides reached the app (--rounds is its num-server-rounds); nothing else was added.
    assert summary["settings"] == {
        "num-server-rounds": 2, "learning-rate": 0.5, "local-steps": 10, "samples-per-node": 400,
    }  # fmt: skip
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert set(rounds) == {1, 2}
    for r in rounds.values():
        assert set(r["metrics"]) == {"loss", "accuracy"} and set(r["train"]) == {
            "train-loss",
            "train-accuracy",
        }
    assert rounds[2]["metrics"]["loss"] < rounds[1]["metrics"]["loss"]
    assert summary["best_round"]["by"] == "accuracy"
    # What the ServerApp wrote in its working directory, and its own output (the table its
    # dependency printed), came back with the run.
    assert summary["app"]["output"] == ["output/final_model.npz"]
    assert len(dict(np.load(run_dir / "output" / "final_model.npz"))) == 2
    log = (run_dir / "serverapp.log").read_text()
    assert "[ROUND 2/2]" in log and "Saved final_model.npz" in log
    assert re.search(r"^\s+2\s+0\.\d+\s+0\.\d+$", log, re.M), log[-800:]
    # flwr run got a copy: the app's own pyproject (with its federations table) is untouched.
    assert (app / "pyproject.toml").read_bytes() == pyproject
    assert running_processes_mentioning(str(project)) == []


def test_a_run_whose_aggregator_is_killed_resumes_with_every_round_once(make_project):
    """SIGKILL the aggregator (its supervisor, SuperLink and ServerApp) in round 2 of 4: the
    run stops saying how to resume; `--resume` goes on from round 1's commit on fresh
    services, and rounds 1..4 appear exactly once, in summary.json and in MLflow."""
    import mlflow

    from fedfleet.workflow import registry_for

    config = local_config(vms_per_participant=1)
    config["fedfleet:participants"] = config["fedfleet:participants"][:2]
    config["fedfleet:app"] = {"strategy": "fedadam", "strategy-options": {"eta": 0.01}}
    project = make_project(config)
    proc = start_run(project, "--rounds", "4", "--json")
    wait_until(lambda: started_round(project, 2), 300, "round 2", proc)
    pidfile = project / ".fedfleet" / "local" / "aggregator" / "supervisor" / "supervisord.pid"
    for pid in tree([int(pidfile.read_text())]):
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 5, err
    (run_dir,) = (project / "runs").glob("2*")
    failed = json.loads((run_dir / "summary.json").read_text())
    assert failed["status"] == "failed" and "aggregator does not answer" in failed["error"]
    assert failed["resume"] == f"fedfleet run --stack local --resume {run_dir.name}"
    assert running_processes_mentioning(str(project)) == []

    resumed = subprocess.run(
        [sys.executable, "-m", "fedfleet", "--project", str(project), "run", "--resume", run_dir.name, "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["run_id"] == run_dir.name and summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3, 4] and summary["rounds_completed"] == 4
    first, second = summary["attempts"]
    assert first["status"] == "failed" and second["resumed_after_round"] >= 1
    done = second["resumed_after_round"]
    # Every round exactly once: one round-end per round over both attempts' events, one model each.
    ends = []
    for events in (run_dir / "events.jsonl", run_dir / "events-attempt-2.jsonl"):
        ends += [json.loads(x)["round"] for x in events.read_text().splitlines() if '"round-end"' in x]
    assert sorted(set(ends)) == [0, 1, 2, 3, 4]
    assert [n for n in ends if n > done] == list(range(done + 1, 5))  # the resumed attempt repeats none
    assert sorted(p.name for p in (run_dir / "models").glob("round-*.pt")) == [
        f"round-{n}.pt" for n in range(5)
    ]
    assert json.loads((run_dir / "summary-attempt-1.json").read_text())["status"] == "failed"
    # The accuracy went on improving from where it was (FedAdam's moments restored).
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert rounds[4]["metrics"]["accuracy"] > rounds[1]["metrics"]["accuracy"]
    # One MLflow run, continued: each round's metrics and model once.
    client = mlflow.MlflowClient(registry_for(load_stack(project, "local"), project).store.uri)
    (record,) = client.search_runs(
        [client.get_experiment_by_name("local").experiment_id], f"tags.`fedfleet.run_id` = '{run_dir.name}'"
    )
    assert record.info.status == "FINISHED" and record.data.tags["fedfleet.resumed"] == "true"
    steps = [m.step for m in client.get_metric_history(record.info.run_id, "accuracy")]
    assert sorted(steps) == [0, 1, 2, 3, 4]
    train_keys = [k for k in record.data.metrics if k.startswith("train/")]
    assert train_keys
    for key in train_keys:  # the rounds' training too, each once
        assert sorted(m.step for m in client.get_metric_history(record.info.run_id, key)) == [1, 2, 3, 4], key
    models = client.search_logged_models(experiment_ids=[record.info.experiment_id])
    assert sorted(int(m.tags["fedfleet.round"]) for m in models) == [0, 1, 2, 3, 4]
    assert running_processes_mentioning(str(project)) == []
    # A completed run does not resume.
    again = subprocess.run(
        [sys.executable, "-m", "fedfleet", "--project", str(project), "run", "--resume", run_dir.name],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert again.returncode == 2 and "nothing to resume" in again.stderr
