"""`fedfleet configure`: the Ansible playbooks in playbooks/, applied through ansible-runner.

Provisioning and configuration meet only through data: the stack's `inventory`
(a Pulumi output, or the local stack's) becomes an Ansible inventory here, with
every role variable as a host or group variable. The same playbooks serve the
local stack (hosts reached with the local connection, services under a
supervisor) and cloud VMs (SSH, systemd).

Every run gets a fresh private data directory that is deleted afterwards, with
`suppress_env_files`, so no key, extravar or environment (ansible-runner stores
the whole environment in artifacts/<id>/command) outlives the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedfleet import localstack
from fedfleet.adapters import flwr as flower
from fedfleet.adapters import netns as localnet
from fedfleet.adapters.pki import ServerTLS, ensure_server_tls
from fedfleet.core.errors import ConfigError, FedfleetError
from fedfleet.core.inventory import VM, Inventory
from fedfleet.core.stack import PROJECT, StackConfig

PLAYBOOKS = Path(__file__).resolve().parents[1] / "playbooks"
APP_PACKAGE = Path(__file__).resolve().parents[1] / "fl" / "fedfleet_app"
SITE = "site.yml"
STOP = "stop.yml"
PROBE = "probe.yml"
# Remote hosts: where fedfleet keeps its state and the Python environment.
REMOTE_HOME = "/opt/fedfleet"
REMOTE_DATA = "/srv/fedfleet"
LOCAL_PYTHON = "/usr/bin/python3"


class ConfigureFailed(FedfleetError):
    """A playbook failed on one or more hosts (the message names each host and task)."""

    exit_code = 6


class Progress(Protocol):
    def task(self, host: str, name: str) -> None: ...
    def result(self, host: str, name: str, status: str) -> None: ...


class _Silent:
    def task(self, host: str, name: str) -> None:
        pass

    def result(self, host: str, name: str, status: str) -> None:
        pass


@dataclass(frozen=True)
class HostProblem:
    host: str
    task: str
    message: str
    unreachable: bool = False

    def describe(self) -> str:
        what = "unreachable" if self.unreachable else f"task {self.task!r} failed"
        return f"{self.host}: {what}: {self.message}"


@dataclass
class PlayResult:
    playbook: str
    seconds: float
    # host -> {ok, changed, failures, unreachable, skipped}
    hosts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[HostProblem] = field(default_factory=list)
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> facts a task returned

    @property
    def changed(self) -> int:
        return sum(h.get("changed", 0) for h in self.hosts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "seconds": round(self.seconds, 2),
            "changed": self.changed,
            "hosts": self.hosts,
            "problems": [p.__dict__ for p in self.problems],
        }


@dataclass(frozen=True)
class ControllerPaths:
    """What the operator's machine keeps for a stack: the CA, node public keys, the flwr connection."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def node_keys(self) -> Path:
        return self.root / "pki" / "node-keys"

    @property
    def operator_home(self) -> Path:
        return self.root / "operator" / "flwr-home"


def controller_paths(stack: StackConfig, project_dir: Path) -> ControllerPaths:
    if stack.is_local:
        return ControllerPaths(localstack.paths(stack, project_dir).root)
    return ControllerPaths(project_dir / ".fedfleet" / stack.name)


def connection_name(stack: StackConfig) -> str:
    return f"fedfleet-{stack.name}"


def prepare_controller(stack: StackConfig, inventory: Inventory, project_dir: Path) -> flower.FlwrCli:
    """The stack's CA and SuperLink certificate (for every address the SuperLink is reached
    at) and the operator's `flwr` connection, which the playbook registers node keys through."""
    ctl = controller_paths(stack, project_dir)
    agg = inventory.aggregator
    names = [agg.address, *([agg.private_ip] if agg.private_ip else []), "127.0.0.1", "localhost"]
    tls: ServerTLS = ensure_server_tls(ctl.pki, names, stack.name)
    cli = flower.FlwrCli(ctl.operator_home, connection_name(stack), f"{agg.address}:{agg.port}", tls.ca_cert)
    cli.write_config()
    return cli


def _group(name: str) -> str:
    """An Ansible group name for a participant (letters, digits and underscores only)."""
    return "participant_" + "".join(c if c.isalnum() else "_" for c in name)


def ansible_inventory(
    stack: StackConfig,
    inventory: Inventory,
    project_dir: Path,
    chosen: Mapping[str, VM],
    *,
    flwr_bin: str,
) -> dict[str, Any]:
    """The Ansible inventory for `inventory`: the aggregator, every participant VM, and the
    `supernodes` group of the VMs chosen to serve (one per participant)."""
    ctl = controller_paths(stack, project_dir)
    agg = inventory.aggregator
    superlink_address = f"{agg.address}:{agg.port}"
    shared: dict[str, Any] = {
        "flower_supernode_superlink": superlink_address,
        "flower_supernode_ca_cert_src": str(ctl.pki / "ca.crt"),
        "flower_supernode_public_keys_dir": str(ctl.node_keys),
        "flower_supernode_flwr_bin": flwr_bin,
        "flower_supernode_flwr_home": str(ctl.operator_home),
        "flower_supernode_connection": connection_name(stack),
        "flower_superlink_tls_src": str(ctl.pki),
        "fedfleet_probe_timeout": stack.orchestrator.probe_timeout,
        "flower_supernode_min_vcpu": stack.orchestrator.min_vcpu,
        "flower_supernode_min_memory_mib": round(stack.orchestrator.min_memory_gib * 1024),
    }
    if stack.is_local:
        shared |= {
            "ansible_connection": "local",
            # Modules need only the standard library; the system Python starts faster.
            "ansible_python_interpreter": LOCAL_PYTHON if Path(LOCAL_PYTHON).exists() else sys.executable,
            "flower_common_venv": sys.prefix,
            "flower_common_install": False,  # the controller's own environment (make setup)
            "flower_common_create_user": False,
            "flower_common_service_manager": "supervisor",
        }
        agg_home = Path(agg.home or localstack.paths(stack, project_dir).aggregator)
        aggregator = {
            "flower_common_home": str(agg_home),
            "flower_common_supervisor_socket": str(localstack.socket_path(agg_home, "supervisor")),
            "flower_superlink_host": agg.address,
            "flower_superlink_port": agg.port,
        }
    else:
        if stack.operator is None:
            raise ConfigError(
                f"{stack.path}: {PROJECT}:operator is required to configure cloud VMs "
                "(adminUser and the SSH key Ansible logs in with)"
            )
        shared |= {
            "ansible_user": stack.operator.admin_user,
            "ansible_become": True,
            "flower_common_home": REMOTE_HOME,
            "flower_supernode_app_src": str(APP_PACKAGE),
        }
        aggregator = {
            "ansible_host": agg.address,
            "flower_superlink_host": "0.0.0.0",  # noqa: S104 (the cloud firewall admits only the sites)
            "flower_superlink_port": agg.port,
        }
    participants: dict[str, Any] = {}
    net = localstack.network(stack, project_dir) if stack.is_local else None
    for participant in stack.participants:
        hosts = {
            vm.name: _vm_vars(stack, project_dir, vm, net) for vm in inventory.participants[participant.name]
        }
        participants[_group(participant.name)] = {"hosts": hosts}
    return {
        "all": {
            "vars": shared,
            "children": {
                "aggregator": {"hosts": {agg.name: aggregator}},
                "participants": {"children": participants},
                "supernodes": {"hosts": {vm.name: {} for vm in chosen.values()}},
            },
        }
    }


def _vm_vars(stack: StackConfig, project_dir: Path, vm: VM, net: localnet.Network | None) -> dict[str, Any]:
    participant = stack.participant(vm.participant)
    common = {
        "flower_supernode_participant": vm.participant,
        "flower_supernode_name": vm.name,
    }
    if stack.is_local:
        home = Path(vm.home or localstack.paths(stack, project_dir).vm_home(vm.name))
        spec = next(s for s in participant.vms if s.name == vm.name)
        return common | {
            # Emulation: a VM marked stopped in the stack file fails its probe.
            "fedfleet_vm_state": spec.state,
            "flower_supernode_vm_vcpu": spec.vcpu,
            "flower_supernode_vm_memory_mib": round(spec.memory_gib * 1024),
            "flower_common_home": str(home),
            "flower_common_supervisor_socket": str(localstack.socket_path(home, "supervisor")),
            "flower_supernode_data_path": str(localstack.data_path(stack, project_dir, vm.participant)),
            "flower_supernode_runtime_host": stack.local.host if stack.local else "127.0.0.1",
            "flower_supernode_runtime_port": vm.port,
            "flower_supernode_worker_enabled": bool(stack.local and stack.local.warm_workers),
            "flower_supernode_worker_socket": str(localstack.socket_path(home, "worker")),
            # Namespaces mode: the VM's services run in its own network namespace.
            "flower_common_netns": net.namespace(vm.name) if net else "",
        }
    data = Path(participant.data_path)
    return common | {
        "ansible_host": vm.private_ip,
        # A relative dataPath is on the site's data disk (mounted at REMOTE_DATA by the site).
        "flower_supernode_data_path": str(data if data.is_absolute() else Path(REMOTE_DATA) / data),
    }


def apply(
    playbook: str,
    inventory: dict[str, Any],
    *,
    limit: str | None = None,
    envvars: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    check: bool = True,
) -> PlayResult:
    """Run `playbook` from playbooks/ over `inventory`; raise ConfigureFailed naming each failed
    host (with `check` false, return the problems in the result instead)."""
    import ansible_runner

    progress = progress or _Silent()
    result = PlayResult(playbook, 0.0)
    current: dict[str, str] = {}

    def on_event(event: dict[str, Any]) -> bool:
        data = event.get("event_data") or {}
        kind = event.get("event", "")
        host = str(data.get("host") or "")
        task = str(data.get("task") or "")
        if kind == "runner_on_start" and host:
            current[host] = task
            progress.task(host, task)
        elif kind in ("runner_on_ok", "runner_on_skipped", "runner_on_failed", "runner_on_unreachable"):
            status = kind.removeprefix("runner_on_")
            res = data.get("res") or {}
            if status == "ok" and res.get("changed"):
                status = "changed"
            if status == "ok" and isinstance(res.get("ansible_facts"), dict):
                result.facts.setdefault(host, {}).update(res["ansible_facts"])
            if kind == "runner_on_failed" and not data.get("ignore_errors"):
                result.problems.append(HostProblem(host, task, _message(res)))
            if kind == "runner_on_unreachable":
                result.problems.append(HostProblem(host, task, _message(res), unreachable=True))
            progress.result(host, task, status)
        elif kind == "playbook_on_stats":
            for key, stat in (
                ("ok", "ok"), ("changed", "changed"), ("failures", "failures"),
                ("dark", "unreachable"), ("skipped", "skipped"),
            ):  # fmt: skip
                for name, count in (data.get(key) or {}).items():
                    result.hosts.setdefault(name, {}).__setitem__(stat, int(count))
        return False  # nothing is kept in artifacts

    # ansible-runner would install SIGINT/SIGTERM handlers of its own and never restore
    # them; ours cancel the playbook (ansible-runner stops it) and are put back after.
    interrupted = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    for sig in previous:
        signal.signal(sig, lambda *_: interrupted.set())
    private = Path(tempfile.mkdtemp(prefix="fedfleet-ansible-"))
    started = time.monotonic()
    try:
        runner = ansible_runner.run(
            cancel_callback=interrupted.is_set,
            private_data_dir=str(private),
            project_dir=str(PLAYBOOKS),
            playbook=playbook,
            inventory=inventory,
            limit=limit,
            envvars={
                "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"),
                "ANSIBLE_LOCAL_TEMP": str(private / "tmp"),
                "ANSIBLE_NOCOLOR": "1",
                # ansible-runner starts ansible-playbook by name: this environment's first.
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                **(envvars or {}),
            },
            event_handler=on_event,
            suppress_env_files=True,
            quiet=True,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        result.seconds = time.monotonic() - started
        shutil.rmtree(private, ignore_errors=True)
    if interrupted.is_set():
        raise KeyboardInterrupt
    if not check and (result.hosts or result.problems):
        return result
    if runner.status != "successful" or result.problems:
        if not result.problems:
            result.problems.append(
                HostProblem(
                    "controller",
                    playbook,
                    f"ansible-playbook ended {runner.status} (exit {runner.rc})"
                    + (": not found; run `make setup`" if runner.rc == 127 else ""),
                )
            )
        raise ConfigureFailed(
            f"{playbook} failed on {len({p.host for p in result.problems})} host(s); the other hosts "
            "were left as they were:\n" + "\n".join("  " + p.describe() for p in result.problems)
        )
    return result


def _message(res: Mapping[str, Any]) -> str:
    """The useful part of a failed task's result, one paragraph."""
    items = [
        r
        for r in res.get("results") or []
        if isinstance(r, dict) and (r.get("failed") or r.get("unreachable"))
    ]
    if items:  # a loop: the items that failed say why
        return "; ".join(dict.fromkeys(_message(r) for r in items))
    parts = [str(res.get("msg") or "").strip()]
    for key in ("stderr", "stdout"):
        text = str(res.get(key) or "").strip()
        if text and text not in parts[0]:
            parts.append(f"{key}: {text[-600:]}")
    if res.get("censored"):
        parts.append("(details hidden: the task handles a secret)")
    return " ".join(p for p in parts if p) or "no message"


def _saved_inventory(stack: StackConfig, project_dir: Path) -> Inventory:
    path = project_dir / ".fedfleet" / stack.name / "inventory.json"
    try:
        return Inventory.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(
            f"stack {stack.name!r} has no inventory yet ({path}): provision it first with "
            f"`fedfleet up --stack {stack.name}` (or `fedfleet outputs --stack {stack.name}` for a "
            "stack that is already up); both need the Pulumi CLI and cloud credentials"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path} is not a fedfleet inventory ({err}); run `fedfleet outputs --stack {stack.name}`"
        ) from err


def configure_stack(
    project_dir: Path,
    stack_name: str,
    *,
    playbook: str = SITE,
    limit: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Apply `playbook` to a stack's hosts; the result (per-host counts, seconds) is also saved
    as .fedfleet/<stack>/<playbook>.json."""
    from fedfleet.core.stack import load_stack
    from fedfleet.runner import prepare_data
    from fedfleet.stages.probe import choose

    stack = load_stack(project_dir, stack_name)
    ctl = controller_paths(stack, project_dir)
    lock = localstack.locked(localstack.paths(stack, project_dir)) if stack.is_local else nullcontext()
    with lock:
        if stack.is_local:
            inventory = localstack.up(stack, project_dir, with_network=playbook == SITE)
            if playbook == SITE:
                prepare_data(stack, project_dir, stack.app)  # the emulated sites' own data
        else:
            inventory = _saved_inventory(stack, project_dir)
        # Where a run would start the SuperNodes (stop: everything it may have started).
        chosen = choose(stack, inventory, project_dir, advance=False)[0] if playbook == SITE else {}
        if playbook == SITE:
            prepare_controller(stack, inventory, project_dir)
        hosts = ansible_inventory(stack, inventory, project_dir, chosen, flwr_bin=flower.tool("flwr"))
        try:
            result = apply(playbook, hosts, limit=limit, progress=progress)
        finally:
            if stack.is_local and playbook == STOP and limit is None:
                # Namespaces mode: what the play could not stop is stopped with them.
                localstack.down_network(stack, project_dir)
    report = {"stack": stack.name, "limit": limit, **result.to_dict()}
    ctl.root.mkdir(parents=True, exist_ok=True)
    (ctl.root / f"{Path(playbook).stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
