"""Configure: Flower on the hosts, with the Ansible playbooks in playbooks/.

Provisioning and configuration meet only through data: the stack's `inventory` (a
Pulumi output, the stack file's own hosts, or the local stack's) becomes an Ansible
inventory here, with every role variable as a host or group variable and each host's
connection from the host itself (`Host.ansible_vars`: local, or SSH through its master
connection). The same playbooks serve every stack.

`Configurer` is what the fleet starts and stops SuperNodes with (site.yml and stop.yml
limited to some hosts).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import re
import sys
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from fedfleet.adapters import ansible, pip
from fedfleet.adapters.flwr import FlwrCli
from fedfleet.adapters.pki import ensure_server_tls
from fedfleet.core.errors import FedfleetError
from fedfleet.core.flowerapp import FlowerApp, env_key
from fedfleet.core.inventory import Inventory
from fedfleet.core.network import Network, plan
from fedfleet.core.paths import StackPaths, data_path, socket_path
from fedfleet.core.stack import StackConfig
from fedfleet.hosts.base import Host

REPO = Path(__file__).resolve().parents[2]
APP_PACKAGE = REPO / "fl" / "fedfleet_app"
LOCK = pip.LOCK
# A relative dataPath on a real host is under the site's data disk (mounted here by the site).
REMOTE_DATA = "/srv/fedfleet"
# What a host's environment needs: Flower, torch and the app's own dependencies (the role
# adds the supervisor where there is no systemd; the wheel cache has it). Versions come
# from requirements.lock.
HOST_PACKAGES = ("flwr", "torch", "numpy", "pillow")


def connection_name(stack: StackConfig) -> str:
    return f"fedfleet-{stack.name}"


def prepare_controller(
    stack: StackConfig, inventory: Inventory, paths: StackPaths, address: str, horizon: dt.timedelta
) -> FlwrCli:
    """The stack's CA and SuperLink certificate (for every address the SuperLink is reached at,
    127.0.0.1 included: the SuperLink itself, and the operator's tunnel), both valid for at
    least `horizon`, and the operator's `flwr` connection to `address` (host:port), which the
    playbook registers node keys through."""
    agg = inventory.aggregator
    names = [agg.address, *filter(None, [agg.private_ip, agg.ssh_address]), "127.0.0.1", "localhost"]
    tls = ensure_server_tls(paths.pki, names, stack.name, horizon)
    cli = FlwrCli(paths.operator_home, connection_name(stack), address, tls.ca_cert)
    cli.write_config()
    return cli


def pins() -> dict[str, str]:
    """name -> version of every package in requirements.lock."""
    out = {}
    for line in LOCK.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            out[match[1].lower()] = match[2]
    return out


def host_requirements() -> list[str]:
    locked = pins()
    return [f"{name}=={locked[name]}" for name in HOST_PACKAGES]


def wheel_cache(paths: StackPaths, app: FlowerApp | None = None) -> Path:
    """The wheels of the hosts' packages for this controller's Python, as the archive hosts
    get (built once; the name says what is in it), with a Flower app's own dependencies."""
    requirements = [*host_requirements(), f"supervisor=={pins()['supervisor']}", *app_requirements(app)]
    digest = hashlib.sha256(("\n".join(requirements) + pip.python_tag()).encode()).hexdigest()[:12]
    cache = pip.build_cache(paths.wheels / f"{pip.python_tag()}-{digest}", requirements, LOCK)
    return pip.archive(cache)


def app_requirements(app: FlowerApp | None) -> list[str]:
    """What a Flower app of your own adds to the hosts' packages (its [project].dependencies,
    but Flower itself, which the hosts have)."""
    return list(app.dependencies) if app is not None else []


def app_distributions(app: FlowerApp) -> list[str]:
    """What a Flower app of your own adds, as a host's environment must have it: name and
    version range (never a URL, which may carry a token)."""
    return [f"{(req := Requirement(text)).name}{req.specifier}" for text in app.dependencies]


def app_archive(paths: StackPaths) -> Path:
    """fedfleet_app's code for the hosts' warm workers, as a tar named by its contents."""
    files = sorted(APP_PACKAGE.glob("*.py"))
    digest = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:12]
    tar = paths.root / "app" / f"fedfleet_app-{digest}.tar"
    if not tar.exists():
        tar.parent.mkdir(parents=True, exist_ok=True)
        pip.pack(APP_PACKAGE, tar, arcname="fedfleet_app")
    return tar


def _group(name: str) -> str:
    """An Ansible group name for a participant (letters, digits and underscores only)."""
    return "participant_" + "".join(c if c.isalnum() else "_" for c in name)


def needs_wheels(stack: StackConfig) -> bool:
    return not stack.is_local and any(
        stack.host(name).install
        for name in ["aggregator", *(vm.name for p in stack.participants for vm in p.vms)]
    )


def ansible_inventory(
    stack: StackConfig,
    inventory: Inventory,
    paths: StackPaths,
    hosts: Mapping[str, Host],
    serving: Iterable[str],
    *,
    flwr_bin: str,
    wheels: Path | None = None,
) -> dict[str, Any]:
    """The Ansible inventory for `inventory`: the aggregator, every participant VM, and the
    `supernodes` group of the VMs chosen to serve (one per participant)."""
    agg = inventory.aggregator
    shared: dict[str, Any] = {
        "flower_supernode_superlink": f"{agg.address}:{agg.port}",
        "flower_supernode_ca_cert_src": str(paths.pki / "ca.crt"),
        "flower_supernode_public_keys_dir": str(paths.node_keys),
        "flower_supernode_flwr_bin": flwr_bin,
        "flower_supernode_flwr_home": str(paths.operator_home),
        "flower_supernode_connection": connection_name(stack),
        "flower_superlink_tls_src": str(paths.pki),
        "fedfleet_probe_timeout": stack.orchestrator.probe_timeout,
        "flower_supernode_min_vcpu": stack.orchestrator.minimums.vcpu,
        "flower_supernode_min_memory_mib": round(stack.orchestrator.minimums.memory_gib * 1024),
    }
    source = stack.flower_app
    if source is not None:  # a Flower app of your own: no warm worker, its own dependencies
        shared["flower_supernode_worker_enabled"] = False
    if stack.is_local:
        shared |= {
            "flower_common_venv": sys.prefix,
            "flower_common_install": False,  # the controller's own environment (make setup)
            "flower_common_create_user": False,
            "flower_common_service_manager": "supervisor",
        }
        if source is not None:  # its environment (the preflight made it) first on the PATH
            shared["flower_common_app_bin"] = str(paths.app_env(env_key(source.app)) / "bin")
    else:
        shared |= {
            "flower_supernode_app_src": str(app_archive(paths)),
            # By name and version range: a URL requirement's wheel is in the cache, found there.
            "flower_common_packages": host_requirements() + (app_distributions(source.app) if source else []),
        }
        if source is not None:  # looked for on every host before its services start
            shared["flower_common_app_distributions"] = app_distributions(source.app)
        if wheels is not None:
            shared |= {"flower_common_wheel_src": str(wheels), "flower_common_wheel_python": pip.python_tag()}
    net = plan(stack, paths.root) if stack.is_local else None
    participants: dict[str, Any] = {}
    node_config = source.node_config_for(stack.participants) if source is not None else {}
    for participant in stack.participants:
        extra = {"flower_supernode_node_config": node_config[participant.name]} if node_config else {}
        participants[_group(participant.name)] = {
            "hosts": {
                vm.name: _vm_vars(stack, paths, hosts[vm.name], vm.name, net) | extra
                for vm in inventory.participants[participant.name]
                if vm.name in hosts
            }
        }
    aggregator = _host_vars(stack, paths, hosts["aggregator"], "aggregator") | {
        # Local: on the loopback (or the bridge); real hosts: every interface, the cloud
        # firewall or the site's own admitting only the participants.
        "flower_superlink_host": agg.address if stack.is_local else "0.0.0.0",  # noqa: S104
        "flower_superlink_port": agg.port,
        "flower_superlink_internal_port": stack.aggregator.internal_port,
    }
    return {
        "all": {
            "vars": shared,
            "children": {
                "aggregator": {"hosts": {"aggregator": aggregator}},
                "participants": {"children": participants},
                "supernodes": {"hosts": {name: {} for name in serving}},
            },
        }
    }


def _host_vars(stack: StackConfig, paths: StackPaths, host: Host, name: str) -> dict[str, Any]:
    """Where fedfleet lives on a host and how its services run there."""
    out = host.ansible_vars() | {"flower_common_home": host.home}
    if stack.is_local:
        return out | {"flower_common_supervisor_socket": str(socket_path(Path(host.home), "supervisor"))}
    spec = stack.host(name)
    return out | {
        "flower_common_venv": spec.venv_path,
        "flower_common_python": spec.python,
        "flower_common_install": spec.install,
        "flower_common_service_manager": spec.service_manager,
    }


def _vm_vars(
    stack: StackConfig, paths: StackPaths, host: Host, name: str, net: Network | None
) -> dict[str, Any]:
    participant = next(p for p in stack.participants if any(vm.name == name for vm in p.vms))
    out = _host_vars(stack, paths, host, name) | {
        "flower_supernode_participant": participant.name,
        "flower_supernode_name": name,
    }
    if stack.is_local:
        assert stack.local is not None
        home = Path(host.home)
        spec = next(s for s in participant.vms if s.name == name)
        return out | {
            # Emulation: a VM marked stopped in the stack file fails its probe.
            "fedfleet_vm_state": spec.state,
            "flower_supernode_vm_vcpu": spec.vcpu,
            "flower_supernode_vm_memory_mib": round((spec.memory_gib or 0) * 1024),
            "flower_supernode_data_path": str(data_path(stack, paths.project, participant.name)),
            "flower_supernode_runtime_host": stack.local.host,
            "flower_supernode_runtime_port": spec.port,
            "flower_supernode_worker_enabled": stack.local.warm_workers and stack.flower_app is None,
            "flower_supernode_worker_socket": str(socket_path(home, "worker")),
            # Namespaces mode: the VM's services run in its own network namespace.
            "flower_common_netns": net.namespace(name) if net else "",
        }
    data = Path(participant.data_path)
    return out | {
        "flower_supernode_data_path": str(data if data.is_absolute() else Path(REMOTE_DATA) / data),
        "flower_supernode_runtime_port": stack.host(name).runtime_port,
    }


class Configurer:
    """Starts and stops Flower on some of a stack's hosts (site.yml / stop.yml, limited)."""

    def __init__(
        self,
        stack: StackConfig,
        inventory: Inventory,
        paths: StackPaths,
        hosts: Mapping[str, Host],
        *,
        flwr_bin: str,
        envvars: Mapping[str, str],
        progress: ansible.Progress,
        wheels: Path | None = None,
    ) -> None:
        self.stack = stack
        self.inventory = inventory
        self.paths = paths
        self.hosts = hosts
        self.flwr_bin = flwr_bin
        self.envvars = dict(envvars)
        self.progress = progress
        self.wheels = wheels
        self.report: dict[str, Any] = {}  # the first play's (the run's configure)
        # The next start of the SuperLink begins with an empty state database (a resumed run),
        # so every SuperNode key registers again.
        self.fresh_superlink = False

    def inventory_for(self, serving: Iterable[str]) -> dict[str, Any]:
        hosts = ansible_inventory(
            self.stack,
            self.inventory,
            self.paths,
            self.hosts,
            serving,
            flwr_bin=self.flwr_bin,
            wheels=self.wheels,
        )
        if self.fresh_superlink:
            hosts["all"]["children"]["aggregator"]["hosts"]["aggregator"]["flower_superlink_fresh_state"] = (
                True
            )
        return hosts

    def forget_registrations(self) -> None:
        """The controller's records of registered SuperNode keys: the next start registers
        every key again (after a fresh SuperLink state)."""
        for record in self.paths.node_keys.glob("*.registered"):
            record.unlink()

    def start(self, serving: Collection[str], limit: Collection[str]) -> dict[str, str]:
        """site.yml on `limit` with `serving` as the SuperNodes; per host that failed, why.
        The aggregator failing raises ConfigureFailed: nothing can run without it."""
        play = ansible.apply(
            ansible.SITE,
            self.inventory_for(serving),
            limit=",".join(limit),
            envvars=self.envvars,
            progress=self.progress,
            check=False,
        )
        if not self.report:
            self.report = play.to_dict()
        if "aggregator" in limit:
            self.fresh_superlink = False
        problems = {p.host: f"{p.task}: {p.message}" for p in play.problems}
        if "aggregator" in limit and "aggregator" in problems:
            raise ansible.ConfigureFailed(
                f"{ansible.SITE} failed on the aggregator:\n"
                + "\n".join("  " + p.describe() for p in play.problems if p.host == "aggregator")
            )
        return problems

    def stop(self, limit: Collection[str], serving: Collection[str] = ()) -> ansible.PlayResult | None:
        """stop.yml on `limit` (None if it failed: what is left is the caller's to sweep)."""
        with contextlib.suppress(FedfleetError):
            return ansible.apply(
                ansible.STOP, self.inventory_for(serving), limit=",".join(limit), envvars=self.envvars
            )
        return None
