"""Stack files (`stacks/Pulumi.<stack>.yaml`) read into frozen, validated objects.

Pure logic: no Pulumi, no Flower. The Pulumi program and the local stack read
the same schema through `parse_stack`; every error names the file, the key as
the user spelled it (`fedfleet:participants[1].vms[0].port`) and the fix.

Schema (keys under `config:`, project `fedfleet`; see Pulumi.yaml for every key):

    fedfleet:aggregator     {cloud, region, instanceType, port}; the first three are
                            written by `fedfleet plan`
    fedfleet:participants   [{name, cloud, region, location, dataPath, cidr, bastion,
                              vms: [{name, vcpu, memoryGib, diskGib, port}]}]
    fedfleet:data           {demo: {partition, alpha, seed}}   (omit demo for real data)
    fedfleet:app            the built-in app's run config (fl/fedfleet_app/settings.py) and
                            model, or {path, config, nodeConfig}: a Flower app of your own
    fedfleet:placement      the user's limits for `fedfleet plan`
    fedfleet:local          {root, host, warmWorkers}: present only in a local stack,
                            whose VMs are emulated on this machine
    fedfleet:ssh            how the controller reaches real hosts: {user, keyFile, port,
                            jumpHost, knownHostsFile, connectTimeoutSeconds}
    fedfleet:registry       {trackingUri, record}: where every run is recorded (MLflow)
    fedfleet:credentials    {aws, gcp, azure}: the stored credential (`fedfleet auth`) each
                            cloud uses; default the only one stored for that cloud

Three kinds of stack, one schema: `local` (fedfleet:local: VMs emulated here), `hosts`
(every VM and the aggregator given by `address`: machines you already have, reached over
SSH, no Pulumi) and `cloud` (Pulumi creates what has no address; mixing is allowed, e.g. a
cloud aggregator with on-premises participants).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedfleet_app.settings import AppSettings, SettingsError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from fedfleet.core import flowerapp
from fedfleet.core.catalog import CLOUDS
from fedfleet.core.credentials import NAME_RE as CREDENTIAL_NAME
from fedfleet.core.errors import ConfigError
from fedfleet.core.placement.problem import Currency, Requirements
from fedfleet.core.selection import Minimums
from fedfleet.core.util import closest

PROJECT = "fedfleet"
Scalar = flowerapp.Scalar
LOCAL = "local"
LOCAL_NETWORKS = ("loopback", "namespaces")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")
TOP_KEYS = (
    "aggregator",
    "participants",
    "data",
    "app",
    "placement",
    "operator",
    "local",
    "orchestrator",
    "ssh",
    "registry",
    "credentials",
)
ONPREM = "onprem"  # the cloud of a participant whose VMs are machines of its own
HOST_KEYS = ("address", "ssh", "home", "python", "venv", "install", "serviceManager", "runtimePort")
SSH_KEYS = ("user", "keyFile", "port", "jumpHost", "hostKey", "knownHostsFile", "connectTimeoutSeconds")
SERVICE_MANAGERS = ("auto", "systemd", "supervisor")
LINUX_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
PLACEMENT_KEYS = (
    "horizonHours", "rounds", "modelSizeMb", "maxCost", "currency", "maxLatencyMs", "weights",
    "minVcpu", "minMemoryGib", "clouds", "regions", "exclude", "catalogOverrides", "baseline",
)  # fmt: skip
PARTITIONS = ("iid", "dirichlet")


@dataclass(frozen=True)
class Location:
    """Where a silo or region is: a cloud region, or a latitude/longitude."""

    cloud: str | None = None
    region: str | None = None
    lat: float | None = None
    lon: float | None = None

    def describe(self) -> str:
        if self.cloud:
            return f"{self.cloud}:{self.region}"
        return f"{self.lat:.2f},{self.lon:.2f}"


@dataclass(frozen=True)
class SSHSettings:
    """How the controller logs in to a host (merged: fedfleet:ssh, the participant's `ssh`,
    the VM's `ssh`). The key file stays on the controller; it is never copied anywhere."""

    user: str = "fedfleet"
    key_file: str | None = None  # None: ssh's own defaults (~/.ssh/id_*, an agent)
    port: int = 22
    jump_host: str | None = None  # [user@]host[:port], reached with the same key
    host_key: str | None = None  # "ssh-ed25519 AAAA...": pinned; None: the first contact is recorded
    known_hosts: str = ".fedfleet/{stack}/known_hosts"
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class HostSpec:
    """A real host fedfleet configures over SSH: one you have (address given) or one Pulumi
    creates (address None: it comes from the stack's inventory)."""

    address: str | None
    ssh: SSHSettings
    home: str = "/opt/fedfleet"  # fedfleet's directory on the host
    python: str = "/usr/bin/python3"  # creates the virtual environment; runs fedfleet's agent
    venv: str | None = None  # default <home>/venv
    install: bool = True  # install the pinned packages from the controller's wheel cache
    service_manager: str = "auto"  # auto: systemd where the host runs it, else a supervisor
    runtime_port: int = 9094  # the SuperNode's local runtime API (loopback)

    @property
    def venv_path(self) -> str:
        return self.venv or f"{self.home.rstrip('/')}/venv"


@dataclass(frozen=True)
class VMSpec:
    name: str
    vcpu: int | None  # None: a host of your own (the probe reads its size)
    memory_gib: float | None
    disk_gib: int | None
    port: int | None = None  # local stack: the SuperNode's runtime API port
    instance_type: str | None = None  # cloud stacks; default: the catalog's cheapest fit
    state: str = "active"  # local stack: "stopped" emulates an inactive VM
    host: HostSpec | None = None  # real hosts (None on the local stack)


@dataclass(frozen=True)
class Participant:
    name: str
    cloud: str
    region: str
    location: Location
    data_path: str
    vms: tuple[VMSpec, ...]
    cidr: str | None = None  # cloud stacks: the site's private network
    egress_cidr: str | None = None  # own hosts: the public addresses they reach a cloud aggregator from
    # Node config for this participant's SuperNode (with the stack's app.nodeConfig).
    node_config: Mapping[str, Scalar] = field(default_factory=dict)
    # Cloud sites: an SSH bastion, the controller's way to the VMs' private addresses (False:
    # the operator reaches them another way, a VPN or an ssh.jumpHost of their own; always
    # False where fedfleet creates no site: the local stack, VMs given by address).
    bastion: bool = True

    @property
    def existing(self) -> bool:
        """Its VMs are machines it already has (given by address), not created by Pulumi."""
        return any(vm.host is not None and vm.host.address for vm in self.vms)


@dataclass(frozen=True)
class Aggregator:
    """Where the aggregator runs: None until `fedfleet plan` has placed it."""

    cloud: str | None
    region: str | None
    instance_type: str | None
    port: int
    cidr: str = "10.10.0.0/24"  # cloud stacks: the aggregator's network
    host: HostSpec | None = None  # real hosts (None on the local stack)
    superlink_address: str | None = None  # where the SuperNodes reach it (default: its address)
    # The SuperLink's own port, on the aggregator's loopback only, behind the proxy that serves
    # `port` (the Fleet API alone) to the participants; the operator's `flwr` reaches it there.
    internal_port: int = 9444

    @property
    def placed(self) -> bool:
        return self.cloud is not None

    @property
    def existing(self) -> bool:
        """A machine you already have (given by address): nothing to place or create."""
        return self.host is not None and self.host.address is not None


@dataclass(frozen=True)
class DemoData:
    partition: str = "dirichlet"
    alpha: float = 1.0
    seed: int = 42


@dataclass(frozen=True)
class LocalSettings:
    root: str = ".fedfleet/{stack}"
    host: str = "127.0.0.1"
    warm_workers: bool = True
    # "loopback": every emulated VM shares this machine's network. "namespaces": each VM
    # has its own network namespace on a private bridge (its link can fail alone).
    network: str = "loopback"
    subnet: str = "10.231.0.0/24"  # namespaces: the bridge takes the first address, VMs the next


@dataclass(frozen=True)
class RegistrySettings:
    """Where every run is recorded (`fedfleet:registry`): MLflow's tracking URI (None: the
    environment's MLFLOW_TRACKING_URI, else the project's own store), and whether to record."""

    tracking_uri: str | None = None
    record: bool = True


@dataclass(frozen=True)
class Orchestrator:
    """How participant VMs are picked: what a VM needs to serve, and how long a probe and a
    SuperNode's first connection to the SuperLink may take."""

    minimums: Minimums = field(default_factory=Minimums)
    probe_timeout: float = 20.0
    connect_timeout: float = 60.0


MODELS_PACKAGE = "fedfleet_models"  # where the stack's model file goes inside the app


@dataclass(frozen=True)
class ModelSource:
    """The stack's own network (`fedfleet:app.model`): a Python file of the project and the
    function in it that builds the model."""

    file: Path  # absolute
    function: str
    setting: str  # as the stack file says it (messages name it)

    @property
    def ref(self) -> str:
        """How the app imports the factory once the file is inside it."""
        return f"{MODELS_PACKAGE}.{self.file.stem}:{self.function}"


# Node-config keys fedfleet gives every SuperNode of a Flower app of your own.
NODE_KEYS = ("participant", "vm", "data-path", "partition-id", "num-partitions")
RESERVED_NODE_KEYS = ("participant", "vm", "data-path", "worker-socket", "worker-key")


@dataclass(frozen=True)
class AppSource:
    """A Flower app of the user's own (`fedfleet:app.path` or `fedfleet run --app`): deployed
    unchanged, with the stack's run-config overrides and node config."""

    app: flowerapp.FlowerApp
    run_config: dict[str, Scalar]  # the app's defaults with the stack's overrides
    overrides: dict[str, Scalar]  # what the stack (or --rounds) changed: passed to `flwr run`
    node_config: dict[str, Scalar]  # every SuperNode's (app.nodeConfig)
    where: str  # the stack key (or option) that named it
    run_timeout: float = 86400.0  # a run still going after this long is stopped (app.runTimeoutSeconds)

    def node_config_for(self, participants: Sequence[Participant]) -> dict[str, dict[str, Scalar]]:
        """Each participant's node config beyond what the SuperNode role sets on every node
        (participant, vm and data-path, the last as the site's path on its host)."""
        out = {}
        for index, p in enumerate(participants):
            out[p.name] = {
                "partition-id": index,
                "num-partitions": len(participants),
                **self.node_config,
                **p.node_config,
            }
        return out


@dataclass(frozen=True)
class StackConfig:
    name: str
    path: Path
    aggregator: Aggregator
    participants: tuple[Participant, ...]
    app: AppSettings
    demo: DemoData | None
    placement: Requirements
    local: LocalSettings | None = None
    operator: Operator | None = None
    orchestrator: Orchestrator = Orchestrator()
    model: ModelSource | None = None
    flower_app: AppSource | None = None  # None: the built-in app (fl/)
    registry: RegistrySettings = RegistrySettings()
    credentials: Mapping[str, str] = field(default_factory=dict)  # cloud -> stored credential name

    @property
    def is_local(self) -> bool:
        return self.local is not None

    @property
    def kind(self) -> str:
        """local (emulated here), hosts (only machines given by address) or cloud (Pulumi
        creates the rest)."""
        if self.is_local:
            return "local"
        if self.aggregator.existing and all(p.existing for p in self.participants):
            return "hosts"
        return "cloud"

    @property
    def provisioned(self) -> bool:
        """Whether Pulumi creates any of its hosts."""
        return self.kind == "cloud"

    def host(self, name: str) -> HostSpec:
        """The host settings of the aggregator ("aggregator") or a participant VM."""
        if name == "aggregator":
            spec = self.aggregator.host
        else:
            spec = next((vm.host for p in self.participants for vm in p.vms if vm.name == name), None)
        if spec is None:
            raise KeyError(name)
        return spec

    def participant(self, name: str) -> Participant:
        for p in self.participants:
            if p.name == name:
                return p
        raise KeyError(name)


def stack_yaml() -> YAML:
    """A round-trip YAML that rewrites a stack file in the style of the shipped ones."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def stack_path(project_dir: Path, stack: str) -> Path:
    return project_dir / "stacks" / f"Pulumi.{stack}.yaml"


def available_stacks(project_dir: Path) -> list[str]:
    return sorted(
        p.name[len("Pulumi.") : -len(".yaml")] for p in (project_dir / "stacks").glob("Pulumi.*.yaml")
    )


def load_stack(project_dir: Path, stack: str) -> StackConfig:
    """Read and validate `stacks/Pulumi.<stack>.yaml`."""
    path = stack_path(project_dir, stack)
    if not path.exists():
        known = available_stacks(project_dir)
        raise ConfigError(
            f"{path}: no such stack file. Stacks here: {', '.join(known) or 'none'}; "
            f"pass --stack with one of them or create {path.name} under stacks/"
        )
    try:
        document = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read: {err}") from err
    if not isinstance(document, Mapping) or not isinstance(document.get("config"), Mapping):
        raise ConfigError(
            f"{path}: expected a Pulumi stack file with a top-level 'config:' mapping "
            f"(keys like '{PROJECT}:participants')"
        )
    return parse_stack(stack, path, document["config"])


def parse_stack(stack: str, path: Path, config: Mapping[str, Any]) -> StackConfig:
    """Validate a stack's `config:` mapping (keys `fedfleet:<name>`)."""
    values: dict[str, Any] = {}
    for key, value in config.items():
        project, _, name = str(key).partition(":")
        if project != PROJECT:
            continue  # other projects' and providers' keys (aws:region, ...) are Pulumi's
        if name not in TOP_KEYS:
            raise ConfigError(f"{path}: {key}: unknown key; {closest(name, TOP_KEYS, PROJECT + ':')}")
        values[name] = value
    r = _Reader(path, f"{PROJECT}:", values)
    is_local = "local" in values
    operator = _operator(r.child("operator", default=None))
    if is_local and "ssh" in values:
        raise r.fail(
            "the local stack emulates its hosts on this machine; SSH settings are for stacks of "
            "real hosts: remove it",
            f"{PROJECT}:ssh",
        )
    ssh = None if is_local else _ssh(r.child("ssh", default={}), SSHSettings(user=_default_user(operator)))
    aggregator = _aggregator(r.child("aggregator"), ssh)
    participants = _participants(r.child("participants"), local=is_local, ssh=ssh)
    _check_existing(r, aggregator, participants)
    demo = _demo(r.child("data", default={}))
    if demo is not None and not is_local:
        raise r.fail(
            "writes the demo partitions on this machine, for the local stack; on real hosts each "
            "site's data is already at its dataPath (fedfleet never copies training data): remove "
            "it and set fedfleet:app.classes",
            f"{PROJECT}:data.demo",
        )
    app_r = r.child("app", default={})
    source = None
    if isinstance(app_r.value, Mapping) and "path" in app_r.value:
        app, model = AppSettings.from_run_config({"min-participants": max(1, len(participants) - 1)}), None
        source = _flower_app(app_r, path.parent.parent)
        app = with_rounds(app, source)
    else:
        app, model = _app(app_r, len(participants), demo, path.parent.parent)
    placement = _placement(r.child("placement", default={}), path.parent.parent)
    local = _local(r.child("local")) if is_local else None
    orchestrator = _orchestrator(r.child("orchestrator", default={}))
    registry = _registry(r.child("registry", default={}))
    credentials = _credentials(r.child("credentials", default={}), is_local)
    if local is not None:
        _check_ports(path, aggregator, participants)
        vms = sum(len(p.vms) for p in participants)
        if local.network == "namespaces" and ipaddress.ip_network(local.subnet).num_addresses - 2 < vms + 1:
            raise ConfigError(
                f"{path}: {PROJECT}:local.subnet: {local.subnet} has too few addresses for the bridge "
                f"and {vms} VMs; use a larger network (like {LocalSettings.subnet})"
            )
    return StackConfig(
        stack,
        path,
        aggregator,
        participants,
        app,
        demo,
        placement,
        local,
        operator,
        orchestrator,
        model,
        source,
        registry,
        credentials,
    )


class _Reader:
    """A mapping or list in the stack file, with the path to it for error messages."""

    def __init__(self, path: Path, key: str, value: Any) -> None:
        self.path, self.key, self.value = path, key, value

    def fail(self, problem: str, key: str | None = None) -> ConfigError:
        return ConfigError(f"{self.path}: {key or self.key}: {problem}")

    def _join(self, name: str) -> str:
        return f"{self.key}{name}" if self.key.endswith(":") else f"{self.key}.{name}"

    def child(self, name: str, default: Any = ...) -> _Reader:
        if not isinstance(self.value, Mapping):
            raise self.fail(f"must be a mapping (got {type(self.value).__name__})")
        if name not in self.value:
            if default is ...:
                raise self.fail("is required but missing", self._join(name))
            return _Reader(self.path, self._join(name), default)
        return _Reader(self.path, self._join(name), self.value[name])

    def items(self) -> list[_Reader]:
        if not isinstance(self.value, list):
            raise self.fail(f"must be a list (got {type(self.value).__name__})")
        return [_Reader(self.path, f"{self.key}[{i}]", v) for i, v in enumerate(self.value)]

    def only(self, allowed: Sequence[str]) -> None:
        if not isinstance(self.value, Mapping):
            raise self.fail(f"must be a mapping (got {type(self.value).__name__})")
        for name in self.value:
            if name not in allowed:
                raise self.fail(f"unknown key; {closest(str(name), allowed)}", self._join(str(name)))

    def text(self, name: str, default: Any = ...) -> str:
        node = self.child(name, default)
        if not isinstance(node.value, str) or not node.value.strip():
            raise node.fail(f"must be a non-empty string (got {node.value!r})")
        return node.value

    def choice(self, name: str, options: Sequence[str], default: Any = ...) -> str:
        node = self.child(name, default)
        if node.value not in options:
            raise node.fail(f"must be one of {', '.join(options)} (got {node.value!r})")
        return str(node.value)

    def num(self, name: str, low: float, high: float, default: Any = ..., whole: bool = False) -> Any:
        node = self.child(name, default)
        v = node.value
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok and whole and isinstance(v, float):
            ok = v.is_integer()
        if not ok or not low <= v <= high:
            kind = "a whole number" if whole else "a number"
            raise node.fail(f"must be {kind} in {low:g}..{high:g} (got {v!r})")
        return int(v) if whole else float(v)


def _name(r: _Reader, field_name: str = "name") -> str:
    value = r.text(field_name)
    if not NAME_RE.match(value):
        raise r.child(field_name).fail(
            f"{value!r} must be 2-40 characters of lowercase letters, digits and '-', "
            "starting with a letter (it becomes part of host names and resource names)"
        )
    return value


def _aggregator(r: _Reader, ssh: SSHSettings | None) -> Aggregator:
    r.only(
        ("cloud", "region", "instanceType", "port", "internalPort", "cidr", "superlinkAddress", *HOST_KEYS)
    )
    placed = [k for k in ("cloud", "region", "instanceType") if k in r.value]
    if placed and len(placed) != 3:
        missing = sorted({"cloud", "region", "instanceType"} - set(placed))
        raise r.fail(
            f"has {', '.join(placed)} but not {', '.join(missing)}: give all three "
            "(`fedfleet plan` writes them) or none"
        )
    host = _host(r, ssh)
    if "superlinkAddress" in r.value and (host is None or host.address is None):
        raise r.child("superlinkAddress").fail(
            "is for an aggregator given by address (a machine you have); a cloud aggregator's "
            "address comes from `fedfleet up`"
        )
    port = r.num("port", 1024, 65535, 9443, whole=True)
    internal = r.num("internalPort", 1024, 65535, port + 1 if port < 65535 else port - 1, whole=True)
    if internal == port:
        raise r.child("internalPort").fail(
            f"is the aggregator's port ({port}); the SuperLink's own loopback port must differ from the "
            "proxy's (default: port + 1)"
        )
    return Aggregator(
        cloud=r.choice("cloud", CLOUDS) if placed else None,
        region=r.text("region") if placed else None,
        instance_type=r.text("instanceType") if placed else None,
        port=port,
        internal_port=internal,
        cidr=_cidr(r, "cidr") if "cidr" in r.value else "10.10.0.0/24",
        host=host,
        superlink_address=_address(r, "superlinkAddress") if "superlinkAddress" in r.value else None,
    )


def _default_user(operator: Operator | None) -> str:
    return operator.admin_user if operator is not None else SSHSettings.user


def _ssh(r: _Reader, base: SSHSettings) -> SSHSettings:
    """SSH settings: `r` (a mapping of SSH_KEYS) over `base`."""
    if not isinstance(r.value, Mapping):
        raise r.fail(f"must be a mapping (got {type(r.value).__name__})")
    r.only(SSH_KEYS)
    user = r.text("user", base.user)
    if not LINUX_USER.fullmatch(user):
        raise r.child("user").fail(f"{user!r} is not a valid Linux user name")
    jump = r.text("jumpHost") if "jumpHost" in r.value else base.jump_host
    if jump is not None and not re.fullmatch(
        r"(?:[a-z_][a-z0-9_-]{0,31}@)?[A-Za-z0-9.:\[\]-]+?(?::\d{1,5})?", jump
    ):
        raise r.child("jumpHost").fail(
            f"{jump!r} must be [user@]host[:port], e.g. fl@gateway.hospital.example:22"
        )
    host_key = r.text("hostKey").strip() if "hostKey" in r.value else base.host_key
    if host_key is not None and (len(host_key.split()) < 2 or host_key.split()[0] not in HOST_KEY_TYPES):
        raise r.child("hostKey").fail(
            "must be the host's public host key as ssh-keyscan prints it, without the host name "
            f"(one of {', '.join(HOST_KEY_TYPES)} then the base64 key)"
        )
    return SSHSettings(
        user=user,
        key_file=r.text("keyFile") if "keyFile" in r.value else base.key_file,
        port=r.num("port", 1, 65535, base.port, whole=True),
        jump_host=jump,
        host_key=host_key,
        known_hosts=r.text("knownHostsFile", base.known_hosts),
        connect_timeout=r.num("connectTimeoutSeconds", 1, 600, base.connect_timeout),
    )


def _address(r: _Reader, name: str) -> str:
    value = r.text(name).strip()
    if not re.fullmatch(r"[A-Za-z0-9.:-]+", value) or value.startswith(("-", ".")):
        raise r.child(name).fail(f"{value!r} is not a host name or IP address")
    return value


def _abs_path(r: _Reader, name: str, default: str | None) -> str | None:
    if name not in r.value:
        return default
    value = r.text(name)
    if not value.startswith("/"):
        raise r.child(name).fail(f"{value!r} must be an absolute path on the host")
    return value


def _host(r: _Reader, ssh: SSHSettings | None) -> HostSpec | None:
    """The host keys of a VM or the aggregator (None on the local stack, which has none)."""
    given = [k for k in HOST_KEYS if k in r.value]
    if ssh is None:
        if given:
            raise r.child(given[0]).fail(
                "the local stack emulates its hosts on this machine; address and SSH settings "
                "are for stacks of real hosts: remove it"
            )
        return None
    d = HostSpec(None, ssh)
    install = r.child("install", d.install)
    if not isinstance(install.value, bool):
        raise install.fail(f"must be true or false (got {install.value!r})")
    home = _abs_path(r, "home", d.home) or d.home
    return HostSpec(
        address=_address(r, "address") if "address" in r.value else None,
        ssh=_ssh(r.child("ssh"), ssh) if "ssh" in r.value else ssh,
        home=home,
        python=_abs_path(r, "python", d.python) or d.python,
        venv=_abs_path(r, "venv", None),
        install=install.value,
        service_manager=r.choice("serviceManager", SERVICE_MANAGERS, d.service_manager),
        runtime_port=r.num("runtimePort", 1024, 65535, d.runtime_port, whole=True),
    )


def _location(r: _Reader) -> Location:
    r.only(("cloud", "region", "lat", "lon"))
    has_region = "cloud" in r.value or "region" in r.value
    has_coords = "lat" in r.value or "lon" in r.value
    if has_region == has_coords:
        raise r.fail("give either {cloud, region} or {lat, lon}")
    if has_region:
        return Location(cloud=r.choice("cloud", CLOUDS), region=r.text("region"))
    return Location(lat=r.num("lat", -90, 90), lon=r.num("lon", -180, 180))


def _participants(r: _Reader, *, local: bool, ssh: SSHSettings | None) -> tuple[Participant, ...]:
    items = r.items()
    if len(items) < 2:
        raise r.fail(f"federated learning needs at least two participants (got {len(items)})")
    participants: list[Participant] = []
    seen_vms: dict[str, str] = {}
    for item in items:
        item.only(PARTICIPANT_KEYS)
        name = _name(item)
        if any(p.name == name for p in participants):
            raise item.child("name").fail(f"participant name {name!r} is used twice")
        vm_items = item.child("vms").items()
        own = sum(isinstance(v.value, Mapping) and "address" in v.value for v in vm_items)
        if own and own != len(vm_items):
            raise item.child("vms").fail(
                f"participant {name!r} mixes VMs given by address with VMs to create; give every "
                "one of its VMs an address (machines it has) or none (Pulumi creates them)"
            )
        existing = bool(own)
        if local and "ssh" in item.value:
            raise item.child("ssh").fail("the local stack emulates its hosts; remove it")
        bastion = _bastion(item, local=local, existing=existing)
        site_ssh = _ssh(item.child("ssh"), ssh) if ssh is not None and "ssh" in item.value else ssh
        if existing:
            cloud = item.choice("cloud", (*CLOUDS, ONPREM), ONPREM)
            region = item.text("region", ONPREM)
        else:
            cloud = item.choice("cloud", (LOCAL,) if local else CLOUDS)
            region = item.text("region")
        if "location" in item.value:
            location = _location(item.child("location"))
        elif cloud == LOCAL:
            raise item.fail("a local participant needs a location: {cloud, region} or {lat, lon}")
        elif cloud == ONPREM:
            location = Location()  # only needed to place a cloud aggregator (checked below)
        else:
            location = Location(cloud=cloud, region=region)
        vms: list[VMSpec] = []
        if not vm_items:
            raise item.child("vms").fail(f"participant {name!r} has no VMs; list at least one")
        for vm in vm_items:
            vm.only(("name", "vcpu", "memoryGib", "diskGib", "port", "instanceType", "state", *HOST_KEYS))
            vm_name = _name(vm)
            if vm_name in seen_vms:
                raise vm.child("name").fail(
                    f"VM name {vm_name!r} is already used by {seen_vms[vm_name]}; "
                    "VM names are unique per stack"
                )
            seen_vms[vm_name] = vm.key
            if existing:
                for key in ("vcpu", "memoryGib", "diskGib", "instanceType", "state", "port"):
                    if key in vm.value:
                        raise vm.child(key).fail(
                            "is for VMs fedfleet creates or emulates; a host given by address is "
                            "probed for its real vCPUs, memory and disk: remove it (the minimums "
                            f"are {PROJECT}:orchestrator's minVcpu, minMemoryGib, minFreeDiskGib)"
                        )
            vms.append(
                VMSpec(
                    name=vm_name,
                    vcpu=None if existing else vm.num("vcpu", 1, 512, whole=True),
                    memory_gib=None if existing else vm.num("memoryGib", 0.5, 4096),
                    disk_gib=None if existing else vm.num("diskGib", 1, 65536, 20, whole=True),
                    port=vm.num("port", 1024, 65535, whole=True) if local else None,
                    instance_type=vm.text("instanceType") if "instanceType" in vm.value else None,
                    state=vm.choice("state", ("active", "stopped"), "active"),
                    host=_host(vm, site_ssh),
                )
            )
        participants.append(
            Participant(
                name=name,
                cloud=cloud,
                region=region,
                location=location,
                data_path=item.text("dataPath", f"sites/{name}/data"),
                vms=tuple(vms),
                cidr=_cidr(item, "cidr") if "cidr" in item.value and not existing else None,
                egress_cidr=_cidr(item, "egressCidr") if "egressCidr" in item.value else None,
                bastion=bastion,
                node_config=_node_config(item.child("nodeConfig", default={})),
            )
        )
        if existing and "cidr" in item.value:
            raise item.child("cidr").fail(
                "is the private network Pulumi creates for a site; this participant's VMs are "
                "given by address: remove it (egressCidr says where they connect from)"
            )
    return tuple(participants)


def _bastion(item: _Reader, *, local: bool, existing: bool) -> bool:
    """Whether `fedfleet up` gives the participant's cloud site an SSH bastion (default: yes)."""
    node = item.child("bastion", True)
    if "bastion" in item.value and local:
        raise node.fail("the local stack emulates its hosts on this machine; remove it")
    if "bastion" in item.value and existing:
        raise node.fail(
            "is the SSH gateway `fedfleet up` creates in a cloud site; this participant's VMs are "
            "given by address, so fedfleet creates nothing for it: remove it (ssh.jumpHost names "
            "a gateway of its own)"
        )
    if not isinstance(node.value, bool):
        raise node.fail(f"must be true or false (got {node.value!r})")
    return node.value and not (local or existing)


def _check_existing(r: _Reader, aggregator: Aggregator, participants: Sequence[Participant]) -> None:
    """What a mix of own hosts and created ones needs."""
    participants_r = r.child("participants").items()
    for item, p in zip(participants_r, participants, strict=True):
        if not p.existing:
            continue
        if not aggregator.existing and p.location.cloud is None and p.location.lat is None:
            raise item.fail(
                f"participant {p.name!r} (machines given by address) needs a location "
                "({lat, lon} or {cloud, region}) to place the aggregator; or give the aggregator "
                "an address too"
            )
        if not aggregator.existing and p.egress_cidr is None:
            raise item.child("egressCidr", default=None).fail(
                f"is required: the cloud aggregator's firewall admits the SuperLink port only from "
                f"the participants, so give the public address range {p.name!r}'s VMs connect "
                "from (e.g. 198.51.100.7/32)"
            )


def _cidr(r: _Reader, name: str) -> str:
    node = r.child(name)
    value = r.text(name)
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as err:
        raise node.fail(f"{value!r} is not a CIDR block ({err}); write e.g. 10.20.0.0/16") from err


# User names Azure refuses for a VM's admin (and that collide with system accounts).
RESERVED_ADMIN_USERS = frozenset(
    {"admin", "administrator", "root", "user", "user1", "test", "test1", "guest", "adm", "sys", "ubuntu"}
)


@dataclass(frozen=True)
class Operator:
    """Who administers the cloud VMs: SSH key and the network SSH is allowed from."""

    ssh_public_key: str
    cidr: str
    admin_user: str = "fedfleet"


def _operator(r: _Reader) -> Operator | None:
    if r.value is None:
        return None
    r.only(("sshPublicKey", "cidr", "adminUser"))
    key = r.text("sshPublicKey").strip()
    if not key.startswith(("ssh-ed25519 ", "ssh-rsa ", "ecdsa-sha2-")):
        raise r.child("sshPublicKey").fail(
            "must be an OpenSSH public key (ssh-ed25519 AAAA..., ecdsa-sha2-..., ssh-rsa ...), "
            "the contents of your ~/.ssh/id_ed25519.pub; never a private key"
        )
    cidr = _cidr(r, "cidr")
    if ipaddress.ip_network(cidr).prefixlen == 0:
        raise r.child("cidr").fail(f"{cidr} would open SSH to the whole internet; give your own network")
    user = r.text("adminUser", "fedfleet")
    if not LINUX_USER.fullmatch(user):
        raise r.child("adminUser").fail(f"{user!r} is not a valid Linux user name")
    if user in RESERVED_ADMIN_USERS:
        raise r.child("adminUser").fail(
            f"{user!r} is reserved (Azure refuses it, and it collides with system accounts); use e.g. fedfleet"
        )
    return Operator(key, cidr, user)


def _orchestrator(r: _Reader) -> Orchestrator:
    if not isinstance(r.value, Mapping):
        raise r.fail(f"must be a mapping (got {type(r.value).__name__})")
    r.only(("minVcpu", "minMemoryGib", "minFreeDiskGib", "probeTimeoutSeconds", "connectTimeoutSeconds"))
    d, m = Orchestrator(), Minimums()
    return Orchestrator(
        minimums=Minimums(
            vcpu=r.num("minVcpu", 1, 1024, m.vcpu, whole=True),
            memory_gib=r.num("minMemoryGib", 0.1, 16384, m.memory_gib),
            free_disk_gib=r.num("minFreeDiskGib", 0, 65536, m.free_disk_gib),
        ),
        probe_timeout=r.num("probeTimeoutSeconds", 1, 600, d.probe_timeout),
        connect_timeout=r.num("connectTimeoutSeconds", 1, 3600, d.connect_timeout),
    )


def _registry(r: _Reader) -> RegistrySettings:
    if r.value is None:
        r = _Reader(r.path, r.key, {})
    r.only(("trackingUri", "record"))
    uri = r.text("trackingUri", "") if r.child("trackingUri", None).value is not None else None
    if uri is not None and "://" not in uri and not uri.startswith(("databricks", "/")):
        raise r.child("trackingUri").fail(
            f"{uri!r} is not a tracking URI MLflow takes: use http(s)://host:port for a tracking server, "
            "sqlite:///path/to/mlflow.db for a database, or leave it out for the project's own store"
        )
    record = r.child("record", True)
    if not isinstance(record.value, bool):
        raise record.fail(f"must be true or false (got {record.value!r})")
    return RegistrySettings(uri, record.value)


def _credentials(r: _Reader, is_local: bool) -> dict[str, str]:
    """`fedfleet:credentials: {aws: NAME, ...}`: which stored credential (`fedfleet auth list`)
    each cloud of the stack uses."""
    if r.value is None:
        return {}
    r.only(CLOUDS)
    if is_local and r.value:
        raise r.fail("the local stack uses no cloud; remove it (it is for stacks Pulumi provisions)")
    names = {}
    for cloud in r.value:
        name = r.text(cloud)
        if not CREDENTIAL_NAME.match(name):
            raise r.child(cloud).fail(
                f"{name!r} is not a credential name (lowercase letters, digits, '.', '_', '-'); "
                "`fedfleet auth list` shows the stored ones"
            )
        names[str(cloud)] = name
    return names


def _demo(r: _Reader) -> DemoData | None:
    r.only(("demo",))
    if "demo" not in r.value:
        return None
    d = r.child("demo")
    if d.value is True:
        return DemoData()
    d.only(("partition", "alpha", "seed"))
    return DemoData(
        partition=d.choice("partition", PARTITIONS, "dirichlet"),
        alpha=d.num("alpha", 0.01, 1000, 1.0),
        seed=d.num("seed", 0, 2**31 - 1, 42, whole=True),
    )


def _app(
    r: _Reader, num_participants: int, demo: DemoData | None, project_dir: Path
) -> tuple[AppSettings, ModelSource | None]:
    if not isinstance(r.value, Mapping):
        raise r.fail(f"must be a mapping (got {type(r.value).__name__})")
    values = dict(r.value)
    model = None
    if "model" in values:
        model = _model(r.child("model"), project_dir)
        values["model"] = model.ref
    for key in ("output-dir", "simulation-data-root", "resume-from"):
        if key in values:
            raise r.fail("is set by fedfleet for each run; remove it", f"{r.key}.{key}")
    if demo is not None:
        for key in ("classes", "image-size", "channels"):
            if key in values:
                raise r.fail(
                    "is fixed by the demo dataset (8x8 grayscale digits, classes 0-9); "
                    "remove it, or remove data.demo to train on your own data",
                    f"{r.key}.{key}",
                )
    elif "classes" not in values:
        raise r.fail(
            "is required with your own data: list the class names, which are also the "
            "class folder names of image-folder data (e.g. [Covid, Normal, Viral Pneumonia])",
            f"{r.key}.classes",
        )
    # All but one: a round goes on while one participant's SuperNode is being replaced.
    values.setdefault("min-participants", max(1, num_participants - 1))
    try:
        app = AppSettings.from_run_config(values, strict=True)
    except SettingsError as err:
        raise r.fail(err.problem, f"{r.key}.{err.key}") from err
    if app.min_participants > num_participants:
        raise r.fail(
            f"is {app.min_participants} but the stack has {num_participants} participants",
            f"{r.key}.min-participants",
        )
    return app, model


APP_KEYS = ("path", "config", "nodeConfig", "runTimeoutSeconds")
PARTICIPANT_KEYS = (
    "name", "cloud", "region", "location", "dataPath", "cidr", "egressCidr", "bastion", "ssh", "vms", "nodeConfig",
)  # fmt: skip


def _flower_app(r: _Reader, project_dir: Path) -> AppSource:
    """`fedfleet:app: {path, config, nodeConfig}`: a Flower app of your own."""
    for key in r.value:
        if key not in APP_KEYS:
            raise r.fail(
                "is a setting of fedfleet's built-in app; a Flower app of your own (app.path) takes "
                "its settings from its pyproject.toml: override them under app.config",
                f"{r.key}.{key}",
            )
    node = r.child("path")
    if not isinstance(node.value, str) or not node.value.strip():
        raise node.fail(f"must be the directory of a Flower app (got {node.value!r})")
    directory = Path(node.value).expanduser()
    app = flowerapp.load(
        directory if directory.is_absolute() else project_dir / directory, f"{r.path}: {node.key}"
    )
    config = r.child("config", default={})
    if not isinstance(config.value, Mapping):
        raise config.fail(
            f"must be a mapping of run-config keys to values (got {type(config.value).__name__})"
        )
    overrides = dict(config.value)
    return AppSource(
        app=app,
        run_config=flowerapp.run_config(app, overrides, f"{r.path}: {config.key}"),
        overrides=overrides,
        node_config=_node_config(r.child("nodeConfig", default={})),
        where=f"{r.path}: {node.key}",
        run_timeout=r.num("runTimeoutSeconds", 60, 30 * 86400, 86400.0),
    )


def flower_app_from(directory: Path, stack: StackConfig) -> StackConfig:
    """`fedfleet run --app DIR`: the stack with the Flower app in `directory` (the stack's own
    app.config and app.nodeConfig apply when the stack names an app too)."""
    app = flowerapp.load(directory.expanduser().resolve(), "--app")
    given = stack.flower_app
    # The stack's overrides are for the app it names: they apply to the same app only.
    overrides = given.overrides if given is not None and given.app.dir == app.dir else {}
    where = f"{stack.path}: {PROJECT}:app.config"
    source = AppSource(
        app=app,
        run_config=flowerapp.run_config(app, overrides, where),
        overrides=dict(overrides),
        node_config=given.node_config if given is not None else {},
        where="--app",
        run_timeout=given.run_timeout if given is not None else AppSource.run_timeout,
    )
    settings = AppSettings.from_run_config({"min-participants": stack.app.min_participants})
    return replace(stack, flower_app=source, model=None, app=with_rounds(settings, source))


def with_rounds(settings: AppSettings, source: AppSource) -> AppSettings:
    """The built-in settings fedfleet's own timing uses, with the app's rounds where it says."""
    key = source.app.rounds_key
    rounds = source.run_config.get(key) if key else None
    if isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1:
        return replace(settings, num_server_rounds=rounds)
    return settings


def set_rounds(source: AppSource, rounds: int) -> AppSource:
    """`--rounds N` for a Flower app of your own: its num-server-rounds (if it has one)."""
    key = source.app.rounds_key
    if key is None:
        raise ConfigError(
            f"--rounds: {source.app.pyproject} [tool.flwr.app.config] has no num-server-rounds; "
            "set the app's own key under app.config in the stack file instead"
        )
    overrides = {**source.overrides, key: rounds}
    return replace(
        source, overrides=overrides, run_config=flowerapp.run_config(source.app, overrides, "--rounds")
    )


def _node_config(r: _Reader) -> dict[str, Scalar]:
    if not isinstance(r.value, Mapping):
        raise r.fail(f"must be a mapping of node-config keys to values (got {type(r.value).__name__})")
    out: dict[str, Scalar] = {}
    for key, value in r.value.items():
        if key in RESERVED_NODE_KEYS:
            raise r.fail(
                "is set by fedfleet for each SuperNode (data-path from the participant's dataPath); "
                "remove it",
                f"{r.key}.{key}",
            )
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", key):
            raise r.fail(f"{key!r} is not a node-config key (letters, digits, '_', '-', '.')")
        if not isinstance(value, (str, int, float, bool)) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            raise r.fail(f"must be a string, a finite number or a boolean (got {value!r})", f"{r.key}.{key}")
        if isinstance(value, str) and '"' in value:
            raise r.fail(
                "cannot hold a double quote (Flower's --node-config cannot carry it)", f"{r.key}.{key}"
            )
        out[key] = value
    return out


def _model(r: _Reader, project_dir: Path) -> ModelSource:
    """`path/to/file.py:function`, the file in the project (it travels inside the app)."""
    text = r.value
    form = "path/to/file.py:function, e.g. models/mynet.py:build"
    if not isinstance(text, str) or text.count(":") != 1:
        raise r.fail(f"must be {form} (got {text!r})")
    where, function = text.split(":")
    path = Path(where).expanduser()
    path = path if path.is_absolute() else project_dir / path
    if path.suffix != ".py" or not path.stem.isidentifier():
        raise r.fail(
            f"{where!r} must be a Python file whose name is a module name (letters, digits, "
            f"underscores): {form}"
        )
    if not function.isidentifier():
        raise r.fail(f"{function!r} is not a Python function name: {form}")
    if not path.is_file():
        raise r.fail(f"{path} does not exist; give the file of your model ({form})")
    return ModelSource(path.resolve(), function, text)


def _placement(r: _Reader, project_dir: Path) -> Requirements:
    """The user's limits for `fedfleet plan` (all optional; CLI flags override them)."""
    r.only(PLACEMENT_KEYS)
    weights = r.child("weights", {"cost": 0.5, "latency": 0.5})
    weights.only(("cost", "latency"))
    w_cost = weights.num("cost", 0, 1000, 0.5)
    w_latency = weights.num("latency", 0, 1000, 0.5)
    if w_cost + w_latency <= 0:
        raise weights.fail("cost and latency weights cannot both be 0")
    currency = r.child("currency", {"code": "USD", "perUsd": 1.0})
    currency.only(("code", "perUsd"))
    code = currency.text("code", "USD")
    baseline = None
    if "baseline" in r.value:
        b = r.child("baseline")
        b.only(("cloud", "region", "instanceType"))
        baseline = (b.choice("cloud", CLOUDS), b.text("region"), b.text("instanceType"))
    overrides = []
    for item in r.child("catalogOverrides", []).items():
        if not isinstance(item.value, str) or not item.value:
            raise item.fail(f"must be a path to a CSV file (got {item.value!r})")
        path = Path(item.value)
        overrides.append(path if path.is_absolute() else project_dir / path)
    return Requirements(
        horizon_hours=r.num("horizonHours", 1, 87_600, 730.0),
        rounds=r.num("rounds", 1, 1_000_000, 100, whole=True),
        model_mb=r.num("modelSizeMb", 0.001, 100_000, 26.0),
        max_cost=r.num("maxCost", 0, 1e12) if "maxCost" in r.value else None,
        max_latency_ms=r.num("maxLatencyMs", 0, 10_000) if "maxLatencyMs" in r.value else None,
        cost_weight=w_cost / (w_cost + w_latency),
        latency_weight=w_latency / (w_cost + w_latency),
        min_vcpu=r.num("minVcpu", 1, 1024, 2, whole=True),
        min_memory_gib=r.num("minMemoryGib", 0, 65536, 4.0),
        clouds=tuple(_names(r.child("clouds", list(CLOUDS)), CLOUDS)),
        regions=tuple(_names(r.child("regions", []))),
        exclude=tuple(_names(r.child("exclude", []))),
        currency=Currency(code, 1.0 if code == "USD" else currency.num("perUsd", 1e-6, 1e9)),
        baseline=baseline,
        catalog_overrides=tuple(overrides),
    )


def _names(r: _Reader, allowed: Sequence[str] | None = None) -> list[str]:
    out = []
    for item in r.items():
        if not isinstance(item.value, str) or not item.value.strip():
            raise item.fail(f"must be a non-empty string (got {item.value!r})")
        if allowed is not None and item.value not in allowed:
            raise item.fail(f"must be one of {', '.join(allowed)} (got {item.value!r})")
        out.append(item.value.strip())
    return out


def _local(r: _Reader) -> LocalSettings:
    if r.value is None:
        r = _Reader(r.path, r.key, {})
    r.only(("root", "host", "warmWorkers", "network", "subnet"))
    host = r.text("host", "127.0.0.1")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as err:
        raise r.child("host").fail(f"{host!r} is not an IP address") from err
    if not ip.is_loopback:
        raise r.child("host").fail(
            f"{host} is not a loopback address; the local stack listens only on this machine (use 127.0.0.1)"
        )
    warm = r.child("warmWorkers", True)
    if not isinstance(warm.value, bool):
        raise warm.fail(f"must be true or false (got {warm.value!r})")
    network = r.choice("network", LOCAL_NETWORKS, LocalSettings.network)
    subnet_text = r.text("subnet", LocalSettings.subnet)
    try:
        subnet = ipaddress.ip_network(subnet_text)
    except ValueError as err:
        raise r.child("subnet").fail(
            f"{subnet_text!r} is not a network (like {LocalSettings.subnet})"
        ) from err
    private = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
    if not any(subnet.version == 4 and subnet.subnet_of(n) for n in private) or subnet.prefixlen > 28:  # type: ignore[arg-type]
        raise r.child("subnet").fail(
            f"{subnet_text} must be a private IPv4 network (RFC 1918: inside 10.0.0.0/8, 172.16.0.0/12 "
            f"or 192.168.0.0/16) of at least 16 addresses (like {LocalSettings.subnet})"
        )
    return LocalSettings(
        root=r.text("root", LocalSettings.root),
        host=host,
        warm_workers=warm.value,
        network=network,
        subnet=str(subnet),
    )


def _check_ports(path: Path, aggregator: Aggregator, participants: Sequence[Participant]) -> None:
    used = {
        aggregator.port: f"{PROJECT}:aggregator.port",
        aggregator.internal_port: f"{PROJECT}:aggregator.internalPort",
    }
    for i, p in enumerate(participants):
        for j, vm in enumerate(p.vms):
            key = f"{PROJECT}:participants[{i}].vms[{j}].port"
            if vm.port in used:
                raise ConfigError(
                    f"{path}: {key}: port {vm.port} is already used by {used[vm.port]}; "
                    "every local VM needs its own port"
                )
            used[vm.port] = key  # type: ignore[index]
