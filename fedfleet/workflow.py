"""The pipeline, composed: plan, provision, connect, probe, configure, train, collect, stop.

Every command that drives hosts is here, and nothing else composes stages (no stage
imports another). The same code runs every kind of stack; only the hosts differ
(`fedfleet.hosts`: the local stack's emulated ones, or real ones over SSH).

One `fedfleet run`:
  1. read and validate the stack file; plan the aggregator (local stack: emulated there);
     lock the stack; stop leftovers of a killed run
  2. provision: the local stack's emulated VMs, or the inventory of real hosts
  3. connect: one SSH connection per real host (each failure named: unreachable, wrong key,
     changed host key, ...); probe every VM and pick one per participant, round-robin
  4. check the local sites' data and ports before anything starts
  5. configure through the Ansible playbooks (site.yml): the SuperLink (TLS, node auth,
     on-disk database) on the aggregator, then on one VM per participant its node key
     (registered through the operator's `flwr`, over a tunnel to a real aggregator), its
     warm worker and flower-supernode; a VM that fails hands over to the next
  6. submit the app with `flwr run`, follow the ServerApp's events on the aggregator, watch
     every host once a second and replace a lost SuperNode on the participant's next VM
  7. stop the services (stop.yml; also on failure, Ctrl-C and SIGTERM), copy every round's
     model, the events and each host's logs into runs/<run-id>/ and write summary.json
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from fedfleet_app.settings import AppSettings

from fedfleet.adapters import ansible, pki
from fedfleet.adapters import mlflow as registry_store
from fedfleet.adapters.flwr import FlwrCli, stage_app, tool, write_run_config
from fedfleet.adapters.processes import ProcessGroup, reap_leftovers
from fedfleet.core.errors import ConfigError, FedfleetError
from fedfleet.core.flowerapp import shown as shown_requirement
from fedfleet.core.init import InitSpec
from fedfleet.core.init import render as render_stack
from fedfleet.core.inventory import Inventory
from fedfleet.core.paths import StackPaths, locked, stack_paths
from fedfleet.core.records import RunRecord, RunState, Timings
from fedfleet.core.registry import Choice, Criteria
from fedfleet.core.selection import Verdict
from fedfleet.core.stack import (
    MODELS_PACKAGE,
    StackConfig,
    flower_app_from,
    load_stack,
    parse_stack,
    set_rounds,
    with_rounds,
)
from fedfleet.core.util import atomic_write, closest
from fedfleet.hosts import Hosts, endpoint, for_stack
from fedfleet.stages import authenticate, collect, configure, fleet, plan, preflight, probe, provision, train
from fedfleet.stages import record as recording
from fedfleet.stages import report as report_stage
from fedfleet.stages import resume as resume_stage

SERVER_RUNS = "runs"  # under the aggregator's fedfleet home: one output directory per run
SERVERAPP_DIR = ".serverapp-dir"  # in it: where the next ServerApp starts (flwr-serverapp reads it)
APP_OUTPUT = collect.APP_OUTPUT  # a foreign app's working directory in its run's output
SERVERAPP_LOG = collect.SERVERAPP_LOG  # a foreign app's ServerApp output, from the SuperLink


class Observer(ansible.Progress, Protocol):
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


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


# -- the stack's hosts, connected --------------------------------------------------------


@dataclass
class Session:
    """A stack's inventory and hosts for one command, with the ones that cannot be reached."""

    stack: StackConfig
    paths: StackPaths
    inventory: Inventory
    hosts: Hosts
    procs: ProcessGroup
    unreachable: dict[str, str]

    def ansible_inventory(self, serving: list[str], wheels: Path | None = None) -> dict[str, Any]:
        return configure.ansible_inventory(
            self.stack, self.inventory, self.paths, self.hosts, serving, flwr_bin=tool("flwr"), wheels=wheels
        )

    def require_aggregator(self) -> None:
        if "aggregator" in self.unreachable:
            raise FedfleetError(f"the aggregator cannot be used: {self.unreachable['aggregator']}")

    def operator_cli(self, settings: AppSettings | None = None) -> FlwrCli:
        """The operator's `flwr`, reaching the SuperLink's own loopback port (behind the proxy
        the participants see) directly (local) or through a tunnel;
        the certificates valid for a run with `settings` (default: the stack's)."""
        return configure.prepare_controller(
            self.stack, self.inventory, self.paths, self.hosts["aggregator"].reach(self.stack.aggregator.internal_port),
            run_horizon(self.stack, settings),
        )  # fmt: skip


def certs_status(project_dir: Path, stack_name: str) -> dict[str, Any]:
    """The stack's CAs and SuperLink certificate, with the horizon a run of it needs."""
    stack = load_stack(project_dir, stack_name)
    out = pki.status(stack_paths(stack, project_dir).pki)
    horizon = run_horizon(stack)
    out["run_horizon_days"] = round(horizon.total_seconds() / 86400, 3)
    cas: list[dict[str, Any]] = out["cas"]
    out["ca_outlasts_a_run"] = bool(cas) and cas[0]["days_left"] > out["run_horizon_days"]
    return out


def certs_rotate(project_dir: Path, stack_name: str, *, keep_previous: bool = True) -> dict[str, Any]:
    """A new CA for the stack (the previous one kept in the trust bundle), the SuperLink's
    certificate re-issued by it; hosts get both at their next configure."""
    stack = load_stack(project_dir, stack_name)
    paths = stack_paths(stack, project_dir)
    with locked(paths):  # not while a run uses the certificates
        return pki.rotate(paths.pki, stack.name, keep_previous=keep_previous)


def run_horizon(stack: StackConfig, settings: AppSettings | None = None) -> dt.timedelta:
    """The longest a run of this stack (with `settings`: its rounds after --rounds or a
    resume) may take: the wait for the participants, then every phase of every round to its
    timeout (train, and evaluate too with `evaluation: separate`; with-train ends on one
    evaluate phase); a foreign app: its run timeout. The certificates must outlast it."""
    if stack.flower_app is not None:
        return dt.timedelta(seconds=stack.flower_app.run_timeout)
    app = settings or stack.app
    phases = app.num_server_rounds * (2 if app.evaluation == "separate" else 1) + (
        app.evaluation != "separate"
    )
    return dt.timedelta(seconds=phases * app.round_timeout + app.node_wait_timeout)


def _inventory(stack: StackConfig, project_dir: Path, *, with_network: bool) -> Inventory:
    if stack.is_local:
        return provision.up_local(stack, project_dir, with_network=with_network)
    provision.check_key_files(stack, project_dir)
    return provision.saved_inventory(stack, project_dir)


@contextmanager
def session(
    stack: StackConfig,
    project_dir: Path,
    *,
    with_network: bool = True,
    say: Callable[[str, str], None] | None = None,
) -> Iterator[Session]:
    """Lock the stack, reap what a killed command left, provision, connect every host; on
    the way out close every connection and (namespaces mode) remove the network."""
    paths = stack_paths(stack, project_dir)
    with locked(paths):
        leftovers = reap_leftovers(paths.pidfile)
        if leftovers and say is not None:
            say("cleanup", f"stopped leftovers of a killed run: {', '.join(leftovers)}")
        with ProcessGroup(paths.pidfile) as procs:
            inventory = _inventory(stack, project_dir, with_network=with_network)
            hosts = for_stack(stack, inventory, paths, procs)
            try:
                if not stack.is_local and say is not None:
                    say("connect", f"SSH to {len(hosts)} hosts (one multiplexed connection each)")
                unreachable = hosts.connect(hosts)
                yield Session(stack, paths, inventory, hosts, procs, unreachable)
            finally:
                hosts.close()
                if stack.is_local and with_network:
                    with contextlib.suppress(FedfleetError):  # the command's own error is the one to see
                        provision.down_network(stack, project_dir)


def _probe(s: Session) -> dict[str, list[Verdict]]:
    return probe.probe(s.stack, s.inventory, s.hosts, s.ansible_inventory([]), s.unreachable)


# -- fedfleet run ------------------------------------------------------------------------


def run(
    project_dir: Path,
    stack_name: str = "local",
    *,
    rounds: int | None = None,
    observer: Observer | None = None,
    app: Path | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """One federated training on a stack; its summary (also runs/<run-id>/summary.json).
    `app`: a Flower app of your own to run instead of the stack's; `resume`: a run to continue
    from its last committed round instead of a new one."""
    observer = observer or _Quiet()
    timings = Timings()
    stack = load_stack(project_dir, stack_name)
    if app is not None:
        stack = flower_app_from(app, stack)
    settings = stack.app
    if rounds is not None:
        if rounds < 1:
            raise ConfigError(f"--rounds must be at least 1 (got {rounds})")
        settings = replace(settings, num_server_rounds=rounds)
        if stack.flower_app is not None:
            source = set_rounds(stack.flower_app, rounds)
            stack = replace(stack, flower_app=source, app=with_rounds(stack.app, source))
    resumption = None
    if resume is not None:
        resumption = resume_stage.check(stack, project_dir, resume, settings, rounds)
        settings = replace(settings, num_server_rounds=resumption.rounds)
    # The certificates must outlast the run: refused here, before anything is created or started.
    horizon = run_horizon(stack, settings)
    pki.check_horizon(stack_paths(stack, project_dir).pki, stack.name, horizon)
    planned = _placement(stack, observer)
    if stack.model is not None:  # before any host is touched
        observer.stage("model", f"{stack.model.setting}: built once for the stack's image size")
    model = preflight.model(stack, settings)
    with (
        checked_app(stack, project_dir, observer) as (app_info, staged),
        session(stack, project_dir, say=observer.stage) as s,
    ):
        observer.stage(
            "probe",
            f"{len(s.inventory.vms())} VMs (playbooks/probe.yml), then one per participant, round-robin",
        )
        s.require_aggregator()
        verdicts = _probe(s)
        chosen, order = probe.choose(stack, s.inventory, s.paths, verdicts, advance=False)
        usable = sum(v.usable for vs in verdicts.values() for v in vs)
        observer.stage(
            "choose",
            ", ".join(f"{p}→{vm.name}" for p, vm in chosen.items())
            + f" ({usable}/{len(s.inventory.vms())} VMs usable)",
        )
        observer.stage("check", "data and ports" if stack.is_local else "key files, inventory")
        sites = preflight.data(stack, project_dir, settings)
        preflight.superlink_port(stack, s.hosts["aggregator"], s.inventory.aggregator.address)
        wheels = None
        if configure.needs_wheels(stack):
            observer.stage("wheels", "the hosts' packages, for an offline install (built once)")
            wheels = configure.wheel_cache(s.paths, stack.flower_app.app if stack.flower_app else None)
        if resumption is not None:
            _resume_from(s, resumption, observer)
        # Reached once the checks passed (a run refused nothing writes) and before any host is configured.
        registry = open_registry(stack, project_dir, observer) if stack.registry.record else None
        timings.mark("setup")
        run_record = _record(stack, settings, s.inventory, planned, order, verdicts, sites)
        run_record.model, run_record.app = model, app_info
        if resumption is not None:
            run_record.run_id = resumption.run_id
        plan_ = RunPlan(settings, verdicts, order, wheels, staged, resumption)
        return Run(s, plan_, run_record, timings, observer, registry).go()


def _resume_from(s: Session, r: resume_stage.Resumption, observer: Observer) -> None:
    """The run's earlier output (fetched from the aggregator if the runner died before
    collecting it), and the newest usable checkpoint in it."""
    aggregator = s.hosts["aggregator"]
    resume_stage.mark(r)  # this attempt's number is taken, whatever happens to it
    # First stop what an earlier attempt left running (a killed runner's ServerApp goes on
    # committing rounds), then fetch what it wrote.
    observer.stage("stop", f"playbooks/{ansible.STOP}: what the earlier attempts left running")
    everything = ["aggregator", *(vm.name for vm in s.inventory.vms())]
    with contextlib.suppress(FedfleetError):  # a host that is gone runs nothing
        ansible.apply(
            ansible.STOP, s.ansible_inventory([]), limit=",".join(everything), check=False, cancellable=False
        )
    for attempt in range(1, r.attempt):
        source = resume_stage.server_dir(aggregator.home, r.run_id, attempt)
        try:
            collect.merge(aggregator, source, r.run_dir, attempt, resume_stage.events_file(attempt))
        except FedfleetError as err:  # an aggregator that is gone: runs/<run-id>/ is what there is
            r.unreachable.append(f"attempt {attempt}'s output on the aggregator: {err}")
    resume_stage.latest(r)
    r.skipped += [f"{name} (never committed)" for name in resume_stage.drop_uncommitted(r)]
    skipped = f"; skipped: {'; '.join(r.skipped)}" if r.skipped else ""
    observer.stage(
        "resume", f"run {r.run_id} after its round {r.done} (of {r.rounds}), attempt {r.attempt}{skipped}"
    )


@contextmanager
def checked_app(
    stack: StackConfig, project_dir: Path, observer: Observer
) -> Iterator[tuple[dict[str, Any] | None, Path | None]]:
    """A Flower app of your own, checked (and its environment made) before any host is touched:
    what it is, and the copy `flwr run` gets (this command's own, removed at the end)."""
    source = stack.flower_app
    if source is None:
        yield None, None
        return
    app = source.app
    extra = f", installing {', '.join(map(shown_requirement, app.dependencies))}" if app.dependencies else ""
    observer.stage(
        "app", f"{app.fab_id} {app.version} from {app.dir}: its FAB, node config, components{extra}"
    )
    paths = stack_paths(stack, project_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".app-", dir=paths.root))
    staged = scratch / app.name  # `flwr build` wants the directory named as the app
    try:
        stage_app(app.dir, staged)
        yield preflight.flower_app(stack, project_dir, paths, staged), staged
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def registry_for(stack: StackConfig, project_dir: Path) -> registry_store.Registry:
    """The stack's model registry (not yet reached)."""
    where = f"{stack.path}: fedfleet:registry.trackingUri"
    return registry_store.Registry(registry_store.resolve(project_dir, stack.registry.tracking_uri, where))


def open_registry(stack: StackConfig, project_dir: Path, observer: Observer) -> registry_store.Registry:
    """The stack's model registry, reached once before any host is touched."""
    registry = registry_for(stack, project_dir)
    observer.stage("registry", f"MLflow at {registry.store.shown} (experiment {stack.name})")
    registry.check()
    return registry


def _placement(stack: StackConfig, observer: Observer) -> dict[str, Any]:
    """Where the aggregator is: planned now on the local stack (and emulated), as placed in
    the stack file on a cloud stack, or a machine of your own."""
    agg = stack.aggregator
    if stack.is_local:
        report = plan.make_plan(stack, stack.placement)
        chosen = report.chosen
        observer.stage(
            "plan",
            f"aggregator on {chosen.candidate.label}, ${chosen.candidate.usd_per_hour:.4f}/h, "
            f"max RTT {chosen.max_rtt_ms:.0f} ms (emulated here)",
        )
        data = plan.report_dict(report)["chosen"]
        return {
            k: data[k]
            for k in ("cloud", "region", "instance_type", "usd_per_hour", "max_rtt_ms", "round_seconds")
        }
    if agg.existing:
        return {"given": True, "cloud": agg.cloud, "region": agg.region, "instance_type": agg.instance_type}
    return {"cloud": agg.cloud, "region": agg.region, "instance_type": agg.instance_type}


def _record(
    stack: StackConfig,
    settings: AppSettings,
    inventory: Inventory,
    planned: dict[str, Any],
    order: dict[str, list[str]],
    verdicts: dict[str, list[Verdict]],
    sites: dict[str, dict[str, int]],
) -> RunRecord:
    agg = inventory.aggregator
    if stack.flower_app is not None:
        run_settings: dict[str, Any] = dict(stack.flower_app.run_config)
    else:
        run_settings = {
            k: v for k, v in settings.to_run_config().items() if k not in ("output-dir", "resume-from")
        }
    return RunRecord(
        run_id=new_run_id(),
        stack=stack.name,
        settings=run_settings,
        aggregator={
            "emulated": stack.is_local,
            "kind": stack.kind,
            "address": f"{agg.address}:{agg.port}",
            "planned": planned,
        },
        participants=[
            {
                "name": p.name,
                "vm": order[p.name][0],
                "failover_order": order[p.name][1:],
                "vms": [
                    {"vm": v.probe.vm, "usable": v.usable, "why_not": v.reason or None}
                    for v in verdicts[p.name]
                ],
                "region": p.region,
                "location": p.location.describe() if p.location.cloud or p.location.lat is not None else None,
                "train_examples": sites.get(p.name, {}).get("train"),
                "test_examples": sites.get(p.name, {}).get("test"),
            }
            for p in stack.participants
        ],
    )


@dataclass(frozen=True)
class RunPlan:
    """What a run was set up to do: its settings and, per participant, its VMs in order."""

    settings: AppSettings
    verdicts: dict[str, list[Verdict]]
    order: dict[str, list[str]]
    wheels: Path | None
    staged: Path | None = None  # a Flower app of your own: the copy `flwr run` gets
    resumption: resume_stage.Resumption | None = None  # a run continued from its last commit


class Run:
    """One run from configure to summary: start the fleet, train, then stop and collect
    whatever happened (the summary is written on every way out)."""

    def __init__(
        self,
        s: Session,
        plan: RunPlan,
        record: RunRecord,
        timings: Timings,
        observer: Observer,
        registry: registry_store.Registry | None = None,
    ) -> None:
        self.s, self.plan, self.record, self.timings, self.observer = s, plan, record, timings, observer
        self.run_dir = s.paths.runs() / record.run_id
        attempt = plan.resumption.attempt if plan.resumption is not None else 1
        self.server_out = resume_stage.server_dir(s.hosts["aggregator"].home, record.run_id, attempt)
        self.recorder: recording.Recorder | None = None
        if registry is not None:
            kind = None if s.stack.flower_app else recording.ModelKind(plan.settings, s.stack.model)
            self.recorder = recording.Recorder(
                registry, s.stack.name, record.run_id, kind=kind, aggregator=s.hosts["aggregator"],
                server_out=self.server_out, scratch=self.run_dir / ".registry-code", local=self.run_dir,
            )  # fmt: skip
        foreign = s.stack.flower_app
        unknown = foreign is not None and foreign.app.rounds_key is None  # its [ROUND n/N] says
        self.state = RunState(0 if unknown else plan.settings.num_server_rounds)
        if plan.resumption is not None:
            resume_stage.seed(plan.resumption, self.state)
        self.cli: FlwrCli | None = None
        # Everything the playbook starts on a local host carries the run's marker: if the
        # stop playbook cannot run, the process group still finds and stops it.
        marker = s.procs.claim("flower services (supervisors of the local hosts)") if s.stack.is_local else {}
        self.launcher = configure.Configurer(
            s.stack, s.inventory, s.paths, s.hosts, flwr_bin=tool("flwr"), envvars=marker, progress=observer,
            wheels=plan.wheels,
        )  # fmt: skip
        rules = fleet.Rules(s.stack.name, s.stack.orchestrator.connect_timeout, s.stack.app.min_participants)
        self.fleet = fleet.Fleet(s.hosts, plan.order, self.launcher, rules, observer.stage)

    def go(self) -> dict[str, Any]:
        r = self.plan.resumption
        self.run_dir.mkdir(parents=True, exist_ok=r is not None)
        if r is not None and r.previous is not None:  # kept beside the new one, as its attempt's
            by = resume_stage.last_attempt(r.previous)
            shutil.copyfile(self.run_dir / "summary.json", self.run_dir / f"summary-attempt-{by}.json")
        if r is None:
            resume_stage.write_identity(self.run_dir, self.s.stack)
        try:
            try:
                self._open_record()
                self._start()
                self._train()
            except BaseException:
                self.observer.stage("stopping", "every process this run started")
                raise
            finally:
                try:
                    self._stop()
                finally:  # the results and logs come back even if the stop was cut short
                    self._collect()
        except BaseException as err:
            self.record.fail(err)
            if (
                self.s.stack.flower_app is None
                and self.state.completed_rounds
                and (self.run_dir / resume_stage.CHECKPOINTS).is_dir()
            ):
                self.record.resume = f"fedfleet run --stack {self.s.stack.name} --resume {self.record.run_id}"
                if isinstance(err, FedfleetError):
                    err.args = (f"{err}; the rounds trained are kept: resume with `{self.record.resume}`",)
            raise
        else:
            self.record.status = "completed"
        finally:
            self.record.orchestration = self.fleet.to_dict()
            if r is not None:
                self.record.attempts = resume_stage.attempts(r, self.fleet.serving, self.record.status)
            self.timings.mark("stopped")
            # summary.json first (a second Ctrl-C must not cost it), then the record's end.
            summary = self.record.summary(self.state, self.timings)
            collect.write_summary(self.run_dir, summary)
            if self.recorder is not None:
                summary["registry"] = self.recorder.drain(
                    10.0 if self.record.status == "interrupted" else 60.0
                )
                collect.write_summary(self.run_dir, summary)  # the record's end stores this one
                self.recorder.close(summary, self.run_dir)
                collect.write_summary(self.run_dir, summary)
                if self.recorder.idle:
                    shutil.rmtree(self.run_dir / ".registry-code", ignore_errors=True)
        return summary

    def _open_record(self) -> None:
        """The run's record in the registry (a resumed run's goes on, the rounds it lacks
        recorded first); a registry that fails here costs the record, not the run."""
        if self.recorder is None:
            return
        r = self.plan.resumption
        try:
            self.recorder.start(
                *_registry_fields(self.record, self.s.stack), resume=r is not None, done=r.done if r else 0
            )
        except FedfleetError as err:
            self.record.registry = {"errors": [f"not recorded: {err}"]}
            self.recorder = None
            return
        if r is not None:
            self.recorder.events(r.seeded)

    def _start(self) -> None:
        """The SuperLink and one connected SuperNode per participant (site.yml; the playbook
        registers node keys through the operator's `flwr`, so its connection comes first).
        A resumed run starts the SuperLink from a fresh state (the old one, left by a SuperLink
        that died, counts its SuperNodes as connected for a minute, refusing them); the keys
        register again."""
        if self.plan.resumption is not None:  # what the earlier attempts left was stopped already
            self.launcher.fresh_superlink = True
            self.launcher.forget_registrations()
        self.cli = self.s.operator_cli(self.plan.settings)
        order = self.plan.order
        self.observer.stage(
            "configure",
            f"playbooks/{ansible.SITE}: SuperLink on the aggregator, SuperNodes on "
            + ", ".join(f"{order[p][0]} ({p})" for p in order),
        )
        try:
            self.fleet.start()
        finally:
            self.record.configure = self.launcher.report
        self.record.serve(self.fleet.serving)
        probe.record_served(self.s.paths, self.plan.verdicts, self.fleet.serving)
        self.timings.mark("configured")

    def _train(self) -> None:
        """Submit the app, follow the ServerApp's progress, watch and fail over meanwhile."""
        aggregator = self.s.hosts["aggregator"]
        pointer = f"{aggregator.home.rstrip('/')}/{SERVER_RUNS}/{SERVERAPP_DIR}"
        try:
            self._submit_and_follow(pointer)
        finally:
            # A later ServerApp on this SuperLink (one started by hand) starts in its own place.
            with contextlib.suppress(FedfleetError):
                aggregator.write(pointer, b"")
        self.timings.mark("trained")

    def _submit_and_follow(self, pointer: str) -> None:
        settings = replace(self.plan.settings, output_dir=self.server_out)
        r = self.plan.resumption
        if r is not None and r.checkpoint is not None:  # the commit it continues from, on the aggregator
            target = f"{self.server_out}/resume/{r.checkpoint.name}"
            self.s.hosts["aggregator"].write(target, r.checkpoint.read_bytes())
            manifest = r.checkpoint.with_suffix(".json")
            self.s.hosts["aggregator"].write(target.removesuffix(".npz") + ".json", manifest.read_bytes())
            settings = replace(settings, resume_from=target)
        cli = self.cli
        assert cli is not None
        foreign = self.s.stack.flower_app
        aggregator = self.s.hosts["aggregator"]
        # Where the ServerApp starts (the SuperLink role's flwr-serverapp reads it): a foreign
        # app's relative writes land in the run's output/, collected into runs/<run-id>/output/.
        start_in = f"{self.server_out}/{APP_OUTPUT}" if foreign else self.server_out
        aggregator.write(pointer, start_in.encode())
        if foreign is None:
            self.fleet.tell_server(f"{self.server_out}/{fleet.FLEET_FILE}")
            run_config: Path | None = write_run_config(
                self.run_dir / "run_config.toml", settings.to_run_config()
            )
            shown = "fl/" if self.s.stack.model is None else f"fl/ with {self.s.stack.model.setting}"
        else:  # only what the stack changes (as checked): Flower refuses keys the app lacks
            changed = {key: foreign.run_config[key] for key in foreign.overrides}
            run_config = write_run_config(self.run_dir / "run_config.toml", changed) if changed else None
            shown = f"{foreign.app.dir} ({foreign.app.fab_id})"
        self.observer.stage("submit", f"flwr run {shown}")
        self.record.flower_run_id = train.submit(cli, self._app(), run_config)
        self.timings.mark("submitted")
        recorder = self.recorder

        def sink(events: list[dict[str, Any]]) -> None:
            self._mirror(events)
            if recorder is not None:
                recorder.events(events)

        if foreign is None or foreign.app.rounds_key is not None:
            self.observer.stage("training", f"{settings.num_server_rounds} rounds")
        else:
            self.observer.stage("training", "as many rounds as the app runs")
        tail: train.EventTail | train.LogTail
        if foreign is None:
            tail = train.EventTail(aggregator, f"{self.server_out}/{train.EVENTS}")
        else:
            tail = train.LogTail(
                cli, self.record.flower_run_id, self.s.procs, self.run_dir / "logs" / "flwr-log.log"
            )
        timeout = foreign.run_timeout if foreign is not None else None
        try:
            train.follow(
                tail, self.state, self.observer, cli, self.record.flower_run_id, self.fleet.check, settings,
                timeout=timeout, sink=sink,
            )  # fmt: skip
            if foreign is None and self.recorder is not None:  # the FAB's hash, for the record
                with contextlib.suppress(FedfleetError):
                    status = cli.status(self.record.flower_run_id)
                    self.record.flower_status = {k: v for k, v in status.items() if k.startswith("fab-")}
        finally:
            if isinstance(tail, train.LogTail):
                tail.close()
                atomic_write(self.run_dir / SERVERAPP_LOG, tail.reader.text)
                self.record.flower_status = tail.status or None

    def _mirror(self, events: list[dict[str, Any]]) -> None:
        """Each round's commit copied here as it is made (beside the aggregator's): a run whose
        aggregator is lost for good resumes from it on other VMs."""
        for event in events:
            if event.get("event") != "round-end" or not event.get("checkpoint"):
                continue
            try:
                resume_stage.mirror(
                    self.s.hosts["aggregator"], self.server_out, str(event["checkpoint"]), self.run_dir
                )
            except (FedfleetError, OSError) as err:
                self.record.collect_errors.append(
                    f"round {event.get('round')}'s checkpoint not copied: {err}"
                )

    def _app(self) -> Path:
        """The app `flwr run` submits: fl/ as it is, a copy with the stack's model file in it
        (it travels to the participants inside the FAB), or a copy of a Flower app of your own
        (`flwr run` rewrites an app's [tool.flwr.federations]: the copy has none)."""
        if self.plan.staged is not None:
            return self.plan.staged
        source = self.s.stack.model
        app_dir = self.s.paths.project / "fl"
        if source is None:
            return app_dir
        return stage_app(app_dir, self.s.paths.root / "app", {MODELS_PACKAGE: [source.file]})

    def _stop(self) -> None:
        _stop(self.launcher, self.fleet, self.record)
        if self.fleet.failovers and self.fleet.serving:  # the next run starts after the replacements
            probe.record_served(self.s.paths, self.plan.verdicts, self.fleet.serving)

    def _collect(self) -> None:
        r = self.plan.resumption
        if r is None:
            _collect(self.s.hosts, self.fleet, self.server_out, self.run_dir, self.record)
        else:
            try:
                collect.merge(
                    self.s.hosts["aggregator"], self.server_out, self.run_dir, r.attempt,
                    resume_stage.events_file(r.attempt),
                )  # fmt: skip
            except FedfleetError as err:
                self.record.collect_errors.append(f"aggregator: {err}")
            self.record.collect_errors += collect.logs(
                self.s.hosts, ["aggregator", *self.fleet.used], self.run_dir, f"logs/attempt-{r.attempt}"
            )
        output = self.run_dir / APP_OUTPUT
        if self.record.app is not None and output.is_dir():
            self.record.app["output"] = sorted(
                str(f.relative_to(self.run_dir)) for f in output.rglob("*") if f.is_file()
            )


def _registry_fields(run: RunRecord, stack: StackConfig) -> tuple[dict[str, str], dict[str, str]]:
    """A run's MLflow parameters (what it was set up with) and first tags."""
    names = recording.names
    params = names.flat_params("app", run.settings)
    params |= names.flat_params("placement", run.aggregator.get("planned", {}))
    params["participants"] = ",".join(p["name"] for p in run.participants)
    for p in run.participants:
        params[f"participant.{p['name']}.vms"] = ",".join([p["vm"], *p.get("failover_order", [])])
    if run.app is not None:
        params |= names.flat_params("flower_app", {k: run.app.get(k) for k in ("fab_id", "version", "path")})
    elif run.model is not None:
        params |= names.flat_params("model", run.model)
    tags = {"fedfleet.kind": stack.kind, "fedfleet.status": "running"}
    return params, tags


def _stop(launcher: configure.Configurer, f: fleet.Fleet, record: RunRecord) -> None:
    """SuperNodes first, then the SuperLink (stop.yml on every host the run used). A host
    that cannot be reached (a lost VM) is named with the command that stops it later."""
    hosts = ["aggregator", *f.used]
    try:
        play = ansible.apply(
            ansible.STOP, launcher.inventory_for(f.serving.values()), limit=",".join(hosts),
            envvars=launcher.envvars, check=False, cancellable=False,
        )  # fmt: skip
    except FedfleetError as err:
        record.stop_error = str(err)  # the process group stops what is left on local hosts
        return
    except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM while stopping
        record.stop_error = "the stop was cut short by a second Ctrl-C or SIGTERM: services may still run"
        record.stop = {"later": f"fedfleet stop --stack {record.stack} --limit {','.join(hosts)}"}
        raise
    record.stop = {"seconds": round(play.seconds, 2)}
    unreachable = sorted({p.host for p in play.problems if p.unreachable})
    failed = [p for p in play.problems if not p.unreachable]
    if unreachable:
        record.stop["unreachable"] = unreachable
        record.stop["later"] = f"fedfleet stop --stack {record.stack} --limit {','.join(unreachable)}"
    if failed:
        record.stop_error = "; ".join(p.describe() for p in failed)


def _collect(hosts: Hosts, f: fleet.Fleet, server_out: str, run_dir: Path, record: RunRecord) -> None:
    try:
        kept = collect.merge(hosts["aggregator"], server_out, run_dir, 1, resume_stage.events_file(1))
        refused = [k for k in kept if not k.startswith(f"{resume_stage.CHECKPOINTS}/")]  # those were mirrored
    except FedfleetError as err:
        record.collect_errors.append(f"aggregator: {err}")
    else:
        if refused:
            record.collect_errors.append(
                f"aggregator: the run's output held {', '.join(refused)}, which fedfleet writes itself: not copied"
            )
    record.collect_errors += collect.logs(hosts, ["aggregator", *f.used], run_dir)


# -- fedfleet models | ui -----------------------------------------------------------------


def registry_at(project_dir: Path, stack_name: str | None) -> registry_store.Registry:
    """The registry of a stack (its fedfleet:registry.trackingUri), or without one the
    project's (MLFLOW_TRACKING_URI, else the project's own store); reached once."""
    if stack_name is not None:
        registry = registry_for(load_stack(project_dir, stack_name), project_dir)
    else:
        registry = registry_store.Registry(registry_store.resolve(project_dir, None, ""))
    database = registry.store.database
    if database is not None and not database.exists():
        raise ConfigError(
            f"no runs recorded yet: {database} does not exist (`fedfleet run` records every run there)"
        )
    registry.check()
    return registry


def models_list(project_dir: Path, stack_name: str | None, run_id: str | None) -> list[dict[str, Any]]:
    return recording.listing(registry_at(project_dir, stack_name), stack_name, run_id)


def models_best(
    project_dir: Path, stack_name: str, run_id: str | None, wanted: Criteria
) -> tuple[Choice, dict[str, Any]]:
    return recording.best(registry_at(project_dir, stack_name), stack_name, run_id, wanted)


def models_download(project_dir: Path, stack_name: str | None, spec: str, dest: Path) -> dict[str, Any]:
    registry = registry_at(project_dir, stack_name)
    return recording.download(registry, recording.resolve_model(registry, stack_name, spec), dest)


def models_report(project_dir: Path, run_id: str) -> dict[str, Any]:
    """runs/<run-id>/report/: curves.png, pareto.png and report.html (self-contained), from the
    run's summary.json; the Pareto plot recomputed from the stack file as it is now."""
    runs = project_dir / "runs"
    known = sorted(p.parent.name for p in runs.glob("*/summary.json")) if runs.is_dir() else []
    matches = [r for r in known if r == run_id] or [r for r in known if r.startswith(run_id)]
    if len(matches) != 1:
        if matches:
            raise ConfigError(f"run {run_id!r} is ambiguous: {', '.join(matches[:5])}; give more of it")
        raise ConfigError(f"no run {run_id!r} with a summary.json under {runs}; {closest(run_id, known)}")
    run_dir = runs / matches[0]
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{run_dir / 'summary.json'} cannot be read: {err}") from err
    out = run_dir / "report"
    curves = report_stage.curves(summary, out / "curves.png")
    pareto, note = None, "recomputed from the stack file as it is now"
    try:
        stack = load_stack(project_dir, str(summary.get("stack")))
        pareto = plan.draw(plan.make_plan(stack, stack.placement), out / "pareto.png")
    except FedfleetError as err:
        note = f"the Pareto plot could not be drawn: {err}"
    page = report_stage.page(summary, curves, pareto, pareto_note=note)
    path = atomic_write(out / "report.html", page)
    return {
        "run": matches[0],
        "report": str(path),
        "curves": curves and str(curves),
        "pareto": pareto and str(pareto),
    }


# -- fedfleet configure | stop | vms -----------------------------------------------------


def configure_stack(
    project_dir: Path,
    stack_name: str,
    *,
    playbook: str = ansible.SITE,
    limit: str | None = None,
    progress: ansible.Progress | None = None,
) -> dict[str, Any]:
    """Apply `playbook` to a stack's hosts; the result (per-host counts, seconds) is also saved
    as .fedfleet/<stack>/<playbook>.json."""
    stack = load_stack(project_dir, stack_name)
    site = playbook == ansible.SITE
    if site:
        with checked_app(stack, project_dir, _Quiet()):  # a Flower app of your own: its environment
            pass
    with session(stack, project_dir, with_network=site) as s:
        wheels = None
        serving: list[str] = []
        if site:
            s.require_aggregator()
            preflight.data(stack, project_dir, stack.app)  # the emulated sites' own data
            preflight.superlink_port(stack, s.hosts["aggregator"], s.inventory.aggregator.address)
            chosen, _ = probe.choose(stack, s.inventory, s.paths, _probe(s), advance=False)
            serving = [vm.name for vm in chosen.values()]  # where a run would start the SuperNodes
            s.operator_cli()
            app = stack.flower_app.app if stack.flower_app else None
            wheels = configure.wheel_cache(s.paths, app) if configure.needs_wheels(stack) else None
        hosts = s.ansible_inventory(serving, wheels)
        try:
            result = ansible.apply(playbook, hosts, limit=limit, progress=progress)
        finally:
            if stack.is_local and not site and limit is None:
                # Namespaces mode: what the play could not stop is stopped with them.
                provision.down_network(stack, project_dir)
    report = {"stack": stack.name, "limit": limit, **result.to_dict()}
    atomic_write(s.paths.report(playbook), json.dumps(report, indent=2) + "\n")
    return report


def vms_report(project_dir: Path, stack_name: str) -> dict[str, Any]:
    """The table behind `fedfleet vms`: each VM's probe, resources and whether it would serve."""
    stack = load_stack(project_dir, stack_name)
    with session(stack, project_dir, with_network=False) as s:
        return probe.report(stack, s.paths, _probe(s))


# -- fedfleet preview | up | outputs | destroy | trust -----------------------------------


def cloud_credentials(
    t: provision.Target, echo: Callable[[str], None], environ: Mapping[str, str]
) -> dict[str, str]:
    """The verified credentials of every cloud Pulumi works in for this stack, as its
    providers' environment variables (none for a local or hosts stack)."""
    if not t.clouds:
        return {}
    store = authenticate.Store(authenticate.store_dir(environ))
    env, used = authenticate.for_clouds(store, t.clouds, t.stack.credentials, environ, t.stack.path)
    for line in used:
        echo(line)
    return env


def preview(t: provision.Target, echo: Callable[[str], None], environ: Mapping[str, str]) -> dict[str, Any]:
    return provision.preview(t, echo, cloud_credentials(t, echo, environ))


def up(t: provision.Target, echo: Callable[[str], None], environ: Mapping[str, str]) -> Inventory:
    return provision.up(t, echo, cloud_credentials(t, echo, environ))


def destroy(t: provision.Target, echo: Callable[[str], None], environ: Mapping[str, str]) -> None:
    if t.stack.is_local:
        paths = stack_paths(t.stack, t.project)
        with locked(paths):
            pass  # refuses while a run holds the stack
        if paths.inventory.exists():
            configure_stack(t.project, t.stack.name, playbook=ansible.STOP)  # services and network
        with locked(paths):
            provision.down_network(t.stack, t.project)  # a network left without an inventory
            root = provision.remove_local(t.stack, t.project)
        echo(f"local stack {t.stack.name}: removed {root} (VM disks, keys, certificates, database)")
        return
    provision.destroy_cloud(t, echo, cloud_credentials(t, echo, environ))


def trust(project_dir: Path, stack_name: str, names: list[str]) -> list[dict[str, Any]]:
    """Accept the current SSH host keys of `names` (after the operator checked that each host
    was rebuilt): log in once, recording the key the host presents in a file of its own, and
    only when that worked replace the recorded key with it. A host that cannot be reached
    keeps its old key; a key pinned in the stack file is changed there, not here."""
    from fedfleet.adapters import ssh

    stack = load_stack(project_dir, stack_name)
    if stack.is_local:
        raise ConfigError(
            f"stack {stack_name!r} is the local stack: its hosts are this machine, with no SSH keys"
        )
    paths = stack_paths(stack, project_dir)
    inventory = provision.saved_inventory(stack, project_dir)
    known = {"aggregator": inventory.aggregator.admin_address} | {
        vm.name: vm.address for vm in inventory.vms()
    }
    out = []
    with locked(paths), ProcessGroup() as procs:
        for name in names:
            if name not in known:
                raise ConfigError(f"stack {stack_name!r} has no host {name!r}; hosts: {', '.join(known)}")
            vm = None if name == "aggregator" else inventory.vm(name)
            label = "aggregator" if vm is None else f"{name} ({vm.participant})"
            ep = endpoint(stack, paths, name, label, known[name], None if vm is None else vm.jump_host)
            if ep.host_key is not None:
                raise ConfigError(
                    f"{stack.path}: the SSH host key of {name} is pinned in the stack file (ssh.hostKey): "
                    "if the host was rebuilt, put its new key there"
                )
            with tempfile.TemporaryDirectory(prefix="fedfleet-trust-") as tmp:
                fresh = replace(ep, known_hosts=Path(tmp) / "known_hosts")  # its jump: the stack's file
                master = ssh.Master(fresh, procs, paths.root / "ssh" / f"{name}.trust.log")
                try:
                    master.open()
                    why = None
                except ssh.SSHFailed as err:
                    why = str(err)
                finally:
                    master.close()
                keys = ssh.recorded(fresh) if why is None else []
                forgot = False
                if keys:
                    forgot = ssh.forget_host_key(ep)
                    ep.known_hosts.parent.mkdir(parents=True, exist_ok=True)
                    with ep.known_hosts.open("a") as fh:
                        fh.writelines(line + "\n" for line in keys)
            out.append(
                {
                    "host": name,
                    "forgot_old_key": forgot,
                    "fingerprint": ssh.fingerprint(ep) if keys else None,
                    "error": why,
                }
            )
    return out


# -- fedfleet init -----------------------------------------------------------------------


def init_stack(project_dir: Path, spec: InitSpec, *, force: bool = False) -> Path:
    """Write stacks/Pulumi.<name>.yaml from `spec`, validated like every stack file first
    (nothing is written when it would not load); an existing file only with `force`."""
    from ruamel.yaml import YAML

    path = project_dir / "stacks" / f"Pulumi.{spec.name}.yaml"
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: choose another name, or --force to replace it")
    text = render_stack(spec)
    parse_stack(spec.name, path, YAML(typ="safe").load(text)["config"])
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, text)
