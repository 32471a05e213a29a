"""`fedfleet run`: plan, provision, configure, orchestrate, train, record.

One run on the local stack:
  1. read and validate the stack file; lock the stack; stop leftovers of a killed run
  2. provision the emulated VMs (`localstack.up`) and write the demo data if asked
  3. check every participant's data and every port before anything starts
  4. start flower-superlink (TLS, node auth, on-disk database), register the
     SuperNode keys it does not know yet, start one flower-supernode per participant
  5. submit the app with `flwr run` and follow the ServerApp's events
  6. stop every process (also on failure and Ctrl-C), collect the models and
     events into runs/<run-id>/ and write summary.json there
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from fedfleet_app import data as app_data
from fedfleet_app import worker
from fedfleet_app.settings import AppSettings

from . import flower, localstack, planner
from .errors import ConfigError, DataError, EnvironmentProblem, FedfleetError, RunFailed
from .inventory import VM, Inventory
from .processes import Managed, ProcessGroup, reap_leftovers
from .results import RunState
from .stack import PROJECT, StackConfig, load_stack

HEALTH_TIMEOUT = 60.0
STATUS_CHECK_AFTER = 20.0  # seconds without events before asking the SuperLink
# Flower's exit codes, as printed in the process log ("Exit Code: 305").
EXIT_HINTS = {
    "Exit Code: 305": "the SuperLink refused this SuperNode: either its key is not "
    "registered (delete the stack's aggregator/registered.json to register again) or an "
    "earlier SuperNode with this key did not sign off cleanly and the SuperLink still "
    "counts it as connected (about 60 s after an unclean stop); wait a minute and retry",
}


class Observer(Protocol):
    def stage(self, name: str, detail: str = "") -> None: ...
    def update(self, state: RunState) -> None: ...


class _Quiet:
    def stage(self, name: str, detail: str = "") -> None:
        pass

    def update(self, state: RunState) -> None:
        pass


@dataclass
class Timings:
    started: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic() - self.started


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def run(
    project_dir: Path,
    stack_name: str = "local",
    *,
    rounds: int | None = None,
    observer: Observer | None = None,
) -> dict[str, Any]:
    """Run one federated training on a local stack; return its summary (also on disk)."""
    observer = observer or _Quiet()
    timings = Timings()
    stack = load_stack(project_dir, stack_name)
    if not stack.is_local:
        raise EnvironmentProblem(
            f"stack {stack_name!r} is a cloud stack (it has no fedfleet:local section): `fedfleet run` "
            "drives local stacks only so far. Runs on cloud VMs need the Pulumi programs and "
            "Ansible playbooks (not built yet) and `pulumi up` on a machine with the Pulumi CLI "
            "and cloud credentials. Use --stack local"
        )
    settings = stack.app
    if rounds is not None:
        if rounds < 1:
            raise ConfigError(f"--rounds must be at least 1 (got {rounds})")
        settings = replace(settings, num_server_rounds=rounds)
    # Plan first, as on a cloud stack: the local stack then emulates the chosen
    # aggregator (the choice is shown and recorded, not written into the stack file).
    placement = planner.make_plan(stack, stack.placement)
    chosen_site = placement.chosen
    observer.stage(
        "plan",
        f"aggregator on {chosen_site.candidate.label}, ${chosen_site.candidate.usd_per_hour:.4f}/h, "
        f"max RTT {chosen_site.max_rtt_ms:.0f} ms (emulated here)",
    )
    local = localstack.paths(stack, project_dir)
    with localstack.locked(local):
        leftovers = reap_leftovers(local.pidfile)
        if leftovers:
            observer.stage("cleanup", f"stopped leftovers of a killed run: {', '.join(leftovers)}")
        observer.stage("provision", f"{len(stack.participants)} participants, local VMs")
        inventory = localstack.up(stack, project_dir)
        chosen = {name: vms[0] for name, vms in inventory.participants.items()}
        observer.stage("configure", "data and ports")
        site_counts = _prepare_data(stack, project_dir, settings)
        _check_ports(stack, chosen)
        timings.mark("setup")
        return _train(
            project_dir, stack, settings, inventory, chosen, site_counts, timings, observer,
            planner.report_dict(placement),
        )  # fmt: skip


def _prepare_data(stack: StackConfig, project_dir: Path, settings: AppSettings) -> dict[str, dict[str, int]]:
    """Write the demo partitions if asked, then load every site's data as its ClientApp will."""
    paths = {p.name: localstack.data_path(stack, project_dir, p.name) for p in stack.participants}
    if stack.demo is not None:
        app_data.write_demo(
            list(paths.values()),
            iid=stack.demo.partition == "iid",
            alpha=stack.demo.alpha,
            seed=stack.demo.seed,
            test_fraction=settings.test_fraction,
        )
    counts = {}
    for index, (name, path) in enumerate(paths.items()):
        try:
            train, test = app_data.load_site(path, settings.data_spec)
        except app_data.DataError as err:
            raise DataError(
                f"participant {name!r} ({stack.path}: {PROJECT}:participants[{index}].dataPath "
                f"= {path}): {err}"
            ) from err
        counts[name] = {"train": len(train), "test": len(test)}
    return counts


def _check_ports(stack: StackConfig, chosen: dict[str, VM]) -> None:
    wanted = [(stack.aggregator.port, f"{PROJECT}:aggregator.port")]
    for index, participant in enumerate(stack.participants):
        vm = chosen[participant.name]
        j = next(j for j, spec in enumerate(participant.vms) if spec.name == vm.name)
        wanted.append((vm.port or 0, f"{PROJECT}:participants[{index}].vms[{j}].port"))
    for port, key in wanted:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As the servers do: connections in TIME_WAIT from a run that just ended
            # must not count, a socket still listening must.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((stack.local.host, port))
            except OSError as err:
                raise EnvironmentProblem(
                    f"port {stack.local.host}:{port} ({stack.path}: {key}) is already in use "
                    f"({err.strerror}). Stop whatever listens there (`ss -ltnp 'sport = :{port}'` "
                    "shows it) or change that key to a free port"
                ) from err


def _train(
    project_dir: Path,
    stack: StackConfig,
    settings: AppSettings,
    inventory: Inventory,
    chosen: dict[str, VM],
    site_counts: dict[str, dict[str, int]],
    timings: Timings,
    observer: Observer,
    plan: dict[str, Any],
) -> dict[str, Any]:
    local = localstack.paths(stack, project_dir)
    run_id = new_run_id()
    run_dir = project_dir / "runs" / run_id
    server_out = local.server_output(run_id)
    run_dir.mkdir(parents=True)
    server_out.mkdir(parents=True)
    settings = replace(settings, output_dir=str(server_out))
    state = RunState(settings.num_server_rounds)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "stack": stack.name,
        "status": "starting",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in settings.to_run_config().items() if k != "output-dir"},
        "aggregator": {
            "emulated": True,
            "address": f"{inventory.aggregator.address}:{inventory.aggregator.port}",
            "planned": {
                k: plan["chosen"][k]
                for k in ("cloud", "region", "instance_type", "usd_per_hour", "max_rtt_ms", "round_seconds")
            },
        },
        "participants": [
            {
                "name": p.name,
                "vm": chosen[p.name].name,
                "region": p.region,
                "location": p.location.describe(),
                "train_examples": site_counts[p.name]["train"],
                "test_examples": site_counts[p.name]["test"],
            }
            for p in stack.participants
        ],
    }
    tls = localstack.server_tls(stack, project_dir)
    address = f"{stack.local.host}:{stack.aggregator.port}"
    cli = flower.FlwrCli(local.operator_home, f"fedfleet-{stack.name}", address, tls.ca_cert)
    try:
        with ProcessGroup(local.pidfile) as procs:
            try:
                # Workers first: importing torch takes them a few seconds of CPU,
                # best spent while the SuperLink starts.
                workers = {
                    vm.name: _start_worker(procs, local, vm, run_dir) if stack.local.warm_workers else {}
                    for vm in chosen.values()
                }
                observer.stage("superlink", address)
                superlink = procs.start(
                    "superlink",
                    flower.superlink_argv(
                        host=stack.local.host,
                        port=stack.aggregator.port,
                        database=local.database,
                        tls=tls,
                    ),
                    flower.flower_env(local.aggregator / "flwr-home"),
                    run_dir / "logs" / "superlink.log",
                    cwd=local.aggregator,
                )
                cli.write_config()
                flower.wait_healthy(
                    f"https://{address}/health",
                    tls.ca_cert,
                    time.monotonic() + HEALTH_TIMEOUT,
                    lambda: _alive(superlink),
                )
                timings.mark("superlink_ready")
                _register(cli, local, chosen)
                timings.mark("registered")
                observer.stage("supernodes", ", ".join(f"{p}→{vm.name}" for p, vm in chosen.items()))
                watched = [superlink, *(p for p in procs.procs if p.tier == 1)]
                watched += [
                    _start_supernode(
                        procs, stack, project_dir, tls.ca_cert, local, vm, run_dir, workers[vm.name]
                    )
                    for vm in chosen.values()
                ]
                run_config = flower.write_run_config(run_dir / "run_config.toml", settings.to_run_config())
                observer.stage("submit", "flwr run fl/")
                flower_run_id = cli.run(project_dir / "fl", run_config)
                summary["flower_run_id"] = flower_run_id
                timings.mark("submitted")
                observer.stage("training", f"{settings.num_server_rounds} rounds")
                _follow(server_out / "events.jsonl", state, observer, cli, flower_run_id, watched, settings)
                timings.mark("trained")
            except BaseException:
                observer.stage("stopping", "every process this run started")
                raise
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        summary["error"] = "interrupted (Ctrl-C or SIGTERM); every process was stopped"
        raise
    except FedfleetError as err:
        summary["status"] = "failed"
        summary["error"] = str(err)
        raise
    except Exception as err:
        summary["status"] = "failed"
        summary["error"] = f"{type(err).__name__}: {err}"
        raise
    else:
        summary["status"] = "completed"
    finally:
        timings.mark("stopped")
        _finish(summary, state, timings, server_out, run_dir, local)
    return summary


def _alive(proc: Managed) -> None:
    code = proc.exit_code()
    if code is not None:
        log = proc.log_tail(40)
        hints = [hint for marker, hint in EXIT_HINTS.items() if marker in log]
        raise RunFailed(
            f"{proc.name} exited with code {code}{''.join('; ' + h for h in hints)}. "
            f"Last lines of {proc.log}:\n{proc.log_tail()}"
        )


def _register(cli: flower.FlwrCli, local: localstack.LocalPaths, chosen: dict[str, VM]) -> None:
    """Register the SuperNode keys this SuperLink database does not hold yet (in parallel)."""
    known = localstack.registered(local)
    missing = [vm for vm in chosen.values() if vm.name not in known]
    if not missing:
        return
    with ThreadPoolExecutor(max_workers=len(missing)) as pool:
        node_ids = list(pool.map(lambda vm: cli.register(local.node_key(vm.name).public), missing))
    for vm, node_id in zip(missing, node_ids, strict=True):
        localstack.remember_registration(local, vm.name, node_id)


def _start_worker(procs: ProcessGroup, local: localstack.LocalPaths, vm: VM, run_dir: Path) -> dict[str, str]:
    """The VM's warm worker (see fl/fedfleet_app/worker.py); returns its node-config keys."""
    home = local.vm_home(vm.name)
    socket_path = worker.socket_path_for(home)
    key_file = home / "worker.key"
    worker.ensure_key(key_file)
    argv = [
        sys.executable,
        "-m",
        "fedfleet_app.worker",
        "--socket",
        str(socket_path),
        "--key-file",
        str(key_file),
    ]
    procs.start(
        f"worker {vm.name} ({vm.participant})",
        argv,
        flower.flower_env(home / "flwr-home"),
        run_dir / "logs" / f"worker-{vm.name}.log",
        cwd=home,
        tier=1,
    )
    return {"worker-socket": str(socket_path), "worker-key": str(key_file)}


def _start_supernode(
    procs: ProcessGroup,
    stack: StackConfig,
    project_dir: Path,
    ca_cert: Path,
    local: localstack.LocalPaths,
    vm: VM,
    run_dir: Path,
    extra_config: dict[str, str],
) -> Managed:
    home = local.vm_home(vm.name)
    return procs.start(
        f"supernode {vm.name} ({vm.participant})",
        flower.supernode_argv(
            superlink=f"{stack.local.host}:{stack.aggregator.port}",
            ca_cert=ca_cert,
            private_key=local.node_key(vm.name).private,
            host=stack.local.host,
            port=vm.port or 0,
            node_config={
                "data-path": str(localstack.data_path(stack, project_dir, vm.participant)),
                "participant": vm.participant,
                "vm": vm.name,
                **extra_config,
            },
        ),
        flower.flower_env(home / "flwr-home", flower.SUPEREXEC_POLL),
        run_dir / "logs" / f"supernode-{vm.name}.log",
        cwd=home,
        tier=1,
    )


class _EventTail:
    """New complete JSON lines of a file that another process appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def _follow(
    events: Path,
    state: RunState,
    observer: Observer,
    cli: flower.FlwrCli,
    flower_run_id: int,
    procs: list[Managed],
    settings: AppSettings,
) -> None:
    """Follow the ServerApp's events until it finishes; raise if anything fails."""
    tail = _EventTail(events)
    # Waiting for the nodes, every round's train phase and the evaluate phase(s), plus slack.
    allowed = settings.node_wait_timeout + 60 + (settings.num_server_rounds + 1) * 2 * settings.round_timeout
    deadline = time.monotonic() + allowed
    last_news = time.monotonic()
    while True:
        new = tail.read()
        for event in new:
            state.apply(event)
        if new:
            last_news = time.monotonic()
            observer.update(state)
        if state.status == "finished":
            return
        if state.status == "failed":
            raise RunFailed(f"the ServerApp failed: {state.error}")
        for proc in procs:
            _alive(proc)
        now = time.monotonic()
        if now - last_news > STATUS_CHECK_AFTER:
            status = cli.status(flower_run_id)
            if str(status.get("status", "")).startswith("finished"):
                tail_events = tail.read()
                for event in tail_events:
                    state.apply(event)
                if state.status == "finished":
                    return
                raise RunFailed(
                    f"Flower run {flower_run_id} ended as {status.get('status')}: "
                    f"{status.get('status-details')}. The ServerApp's log is in "
                    f"{procs[0].log}:\n{procs[0].log_tail()}"
                )
            last_news = now
        if now > deadline:
            cli.stop(flower_run_id)
            raise RunFailed(f"run did not finish within {deadline - (last_news - STATUS_CHECK_AFTER):.0f} s")
        time.sleep(0.2)


def _finish(
    summary: dict[str, Any],
    state: RunState,
    timings: Timings,
    server_out: Path,
    run_dir: Path,
    local: localstack.LocalPaths,
) -> None:
    """Collect the aggregator's outputs into the run directory and write summary.json."""
    if server_out.exists():
        for item in server_out.iterdir():
            target = run_dir / item.name
            if item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target)
    node_names = {v: k for k, v in localstack.registered(local).items()}
    best = state.best_round("accuracy")
    rounds = state.rounds_list()
    trained = [r for r in rounds if r["round"] > 0 and r["seconds"] is not None]

    def mean(key: str) -> float | None:
        values = [r[key] for r in trained if r[key] is not None]
        return sum(values) / len(values) if values else None

    marks = timings.marks
    summary.update(
        {
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
            "errors": [{**e, "vm": node_names.get(e.get("node"))} for e in state.errors],
            "timings": {
                "total_seconds": marks.get("stopped"),
                "setup_seconds": marks.get("setup"),
                "superlink_ready_seconds": _between(marks, "setup", "superlink_ready"),
                "submit_seconds": _between(marks, "registered", "submitted"),
                "training_seconds": _between(marks, "submitted", "trained"),
                "teardown_seconds": _between(marks, "trained", "stopped"),
                "round_mean_seconds": mean("seconds"),
                "round_mean_client_compute_seconds": mean("client_compute_seconds"),
                "round_mean_overhead_seconds": mean("overhead_seconds"),
            },
        }
    )
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run_dir / "summary.json")


def _between(marks: dict[str, float], start: str, end: str) -> float | None:
    if start in marks and end in marks:
        return marks[end] - marks[start]
    return None
