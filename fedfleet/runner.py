"""`fedfleet run`: plan, provision, configure, orchestrate, train, record.

One run on the local stack:
  1. read and validate the stack file; plan; lock the stack; stop leftovers of a killed run
  2. provision the emulated VMs (`localstack.up`) and write the demo data if asked
  3. check every participant's data and every port before anything starts
  4. configure through the Ansible playbooks (playbooks/site.yml, as on cloud VMs):
     flower-superlink (TLS, node auth, on-disk database) on the aggregator, then on one
     VM per participant its node key (registered with the SuperLink), its warm worker
     and flower-supernode, all under each host's supervisor
  5. submit the app with `flwr run` and follow the ServerApp's events, watching the
     services through their supervisors
  6. stop the services (playbooks/stop.yml; also on failure and Ctrl-C, and anything
     left carrying the run's marker), collect the models and events into
     runs/<run-id>/ and write summary.json there
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from fedfleet_app import data as app_data
from fedfleet_app.settings import AppSettings

from fedfleet import configure, localstack, supervision
from fedfleet.adapters import flwr as flower
from fedfleet.adapters.processes import ProcessGroup, reap_leftovers
from fedfleet.core.errors import ConfigError, DataError, EnvironmentProblem, FedfleetError, RunFailed
from fedfleet.core.inventory import VM, Inventory
from fedfleet.core.records import RunState
from fedfleet.core.stack import PROJECT, StackConfig, load_stack
from fedfleet.stages import plan as planner
from fedfleet.stages import probe as orchestrator
from fedfleet.stages.fleet import FLEET_FILE, Fleet

STATUS_CHECK_AFTER = 20.0  # seconds without events before asking the SuperLink
SERVICE_CHECK_EVERY = 1.0  # seconds between asking the hosts' supervisors


class Observer(configure.Progress, Protocol):
    def stage(self, name: str, detail: str = "") -> None: ...
    def update(self, state: RunState) -> None: ...


class _Quiet:
    def stage(self, name: str, detail: str = "") -> None:
        pass

    def update(self, state: RunState) -> None:
        pass

    def task(self, host: str, name: str) -> None:
        pass

    def result(self, host: str, name: str, status: str) -> None:
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
            "drives local stacks only so far. On a machine with the Pulumi CLI and the clouds' "
            f"credentials, `fedfleet up --stack {stack_name}` creates the VMs and `fedfleet configure "
            f"--stack {stack_name}` starts Flower on them; submitting runs to cloud VMs (and failing "
            "over there) is not built yet. Use --stack local"
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
        try:
            vm_count = sum(len(vms) for vms in inventory.participants.values())
            observer.stage(
                "probe", f"{vm_count} VMs (playbooks/probe.yml), then one per participant, round-robin"
            )
            chosen, order, verdicts = orchestrator.choose(stack, inventory, project_dir, advance=False)
            observer.stage(
                "choose",
                ", ".join(f"{p}→{vm.name}" for p, vm in chosen.items())
                + f" ({sum(v.usable for vs in verdicts.values() for v in vs)}/{vm_count} VMs usable)",
            )
            observer.stage("check", "data and ports")
            site_counts = prepare_data(stack, project_dir, settings)
            _check_ports(stack, localstack.paths(stack, project_dir), inventory.aggregator.address)
            timings.mark("setup")
            vms = {
                p: [{"vm": v.probe.vm, "usable": v.usable, "why_not": v.reason or None} for v in vs]
                for p, vs in verdicts.items()
            }
            summary = _train(
                project_dir, stack, settings, inventory, chosen, site_counts, timings, observer,
                planner.report_dict(placement), {"order": order, "vms": vms, "verdicts": verdicts},
            )  # fmt: skip
        except BaseException:
            with contextlib.suppress(FedfleetError):  # the run's own error is the one to see
                localstack.down_network(stack, project_dir)
            raise
        localstack.down_network(stack, project_dir)  # namespaces mode: nothing runs there now
        return summary


def prepare_data(stack: StackConfig, project_dir: Path, settings: AppSettings) -> dict[str, dict[str, int]]:
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


def _check_ports(stack: StackConfig, local: localstack.LocalPaths, address: str) -> None:
    """The SuperLink's port is free, or held by the aggregator's own running service.

    (A participant VM's port is checked by the SuperNode role's preflight: a VM whose port
    is taken fails to start and the participant's next VM takes over.)"""
    assert stack.local is not None
    wanted = [(stack.aggregator.port, f"{PROJECT}:aggregator.port", local.aggregator)]
    for port, key, home in wanted:
        if supervision.status("", localstack.socket_path(home, "supervisor"), timeout=1.0).reachable:
            continue  # that host's services run (a `fedfleet configure` before); the playbook checks them
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As the servers do: connections in TIME_WAIT from a run that just ended
            # must not count, a socket still listening must.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as err:
                raise EnvironmentProblem(
                    f"port {address}:{port} ({stack.path}: {key}) is already in use "
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
    selection: dict[str, Any],
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
                "failover_order": selection["order"][p.name][1:],
                "vms": selection["vms"][p.name],
                "region": p.region,
                "location": p.location.describe(),
                "train_examples": site_counts[p.name]["train"],
                "test_examples": site_counts[p.name]["test"],
            }
            for p in stack.participants
        ],
    }
    cli = configure.prepare_controller(stack, inventory, project_dir)
    fleet: Fleet | None = None

    def remember_served() -> None:
        assert fleet is not None
        served = {p: vm.name for p, vm in fleet.serving.items()}
        orchestrator.record_served(stack, project_dir, selection["verdicts"], served)

    try:
        with ProcessGroup(local.pidfile) as procs:
            # Everything the playbook starts carries this run's marker: if the stop
            # playbook cannot run, the ProcessGroup still finds and stops it.
            marker = procs.claim("flower services (supervisors of the local hosts)")
            fleet = Fleet(
                stack, inventory, project_dir, selection["order"],
                envvars=marker, progress=observer, say=observer.stage,
            )  # fmt: skip
            try:
                observer.stage(
                    "configure",
                    f"playbooks/{configure.SITE}: SuperLink on {inventory.aggregator.name}, SuperNodes on "
                    + ", ".join(f"{vm.name} ({p})" for p, vm in chosen.items()),
                )
                try:
                    fleet.start()
                finally:
                    summary["configure"] = fleet.configure_report
                for entry in summary["participants"]:
                    entry["vm"] = fleet.serving[entry["name"]].name
                remember_served()
                timings.mark("configured")
                fleet.tell_server(server_out / FLEET_FILE)
                run_config = flower.write_run_config(run_dir / "run_config.toml", settings.to_run_config())
                observer.stage("submit", "flwr run fl/")
                flower_run_id = cli.run(project_dir / "fl", run_config)
                summary["flower_run_id"] = flower_run_id
                timings.mark("submitted")
                observer.stage("training", f"{settings.num_server_rounds} rounds")
                _follow(server_out / "events.jsonl", state, observer, cli, flower_run_id, fleet, settings)
                timings.mark("trained")
            except BaseException:
                observer.stage("stopping", "every process this run started")
                raise
            finally:
                _stop_services(fleet.hosts(), marker, summary)
                _collect_logs(local, inventory, fleet.used, run_dir)
                if fleet.failovers and fleet.serving:  # the next run starts after the replacements
                    remember_served()
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
        if fleet is not None:
            summary["orchestration"] = fleet.to_dict()
        timings.mark("stopped")
        _finish(summary, state, timings, server_out, run_dir, local)
    return summary


def _stop_services(hosts: dict[str, Any], marker: dict[str, str], summary: dict[str, Any]) -> None:
    """SuperNodes first, then the SuperLink, through playbooks/stop.yml."""
    try:
        play = configure.apply(configure.STOP, hosts, envvars=marker)
    except FedfleetError as err:
        summary["stop_error"] = str(err)  # the ProcessGroup stops what is left
    else:
        summary["stop"] = {"seconds": round(play.seconds, 2)}


def _collect_logs(local: localstack.LocalPaths, inventory: Inventory, used: list[str], run_dir: Path) -> None:
    """Copy the hosts' service logs into the run directory (local hosts only)."""
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    homes = {"aggregator": local.aggregator}
    homes |= {vm: Path(inventory.vm(vm).home or local.vm_home(vm)) for vm in used}
    for host, home in homes.items():
        for log in sorted((home / "supervisor").glob("*.log")):
            shutil.copy2(log, logs / f"{host}-{log.name}")


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
    fleet: Fleet,
    settings: AppSettings,
) -> None:
    """Follow the ServerApp's events until it finishes; raise if anything fails."""
    tail = _EventTail(events)
    # Waiting for the nodes, every round's train phase and the evaluate phase(s), plus slack.
    allowed = settings.node_wait_timeout + 60 + (settings.num_server_rounds + 1) * 2 * settings.round_timeout
    deadline = time.monotonic() + allowed
    last_news = time.monotonic()
    last_check = 0.0
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
        now = time.monotonic()
        if now - last_check >= SERVICE_CHECK_EVERY:
            fleet.check()  # may start a replacement SuperNode (the ServerApp waits for it)
            last_check = time.monotonic()
            deadline += last_check - now  # time spent starting a replacement does not count
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
                    f"{status.get('status-details')}. The ServerApp's log is the SuperLink's "
                    f"(runs/<run-id>/logs/aggregator-flower-superlink.log)"
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
            "errors": state.errors,
            "timings": {
                "total_seconds": marks.get("stopped"),
                "setup_seconds": marks.get("setup"),
                "configure_seconds": _between(marks, "setup", "configured"),
                "submit_seconds": _between(marks, "configured", "submitted"),
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
