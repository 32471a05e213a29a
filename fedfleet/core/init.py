"""`fedfleet init`: a new stack file, commented, from a few answers (pure: text out).

The file is the interface (like `flwr new`, not a wizard that hides it): every value
`init` fills in is written out with a comment saying what it is and what else it
could be, so the next step is reading and editing it. The caller validates the text
with the same parser as every stack file before it is written.

Three kinds, as `fedfleet run` knows them:
  local   every host emulated on this machine (the demo data, or a folder per site)
  hosts   the sites' own machines, reached over SSH (no Pulumi)
  cloud   VMs `fedfleet up` creates with Pulumi in each site's cloud and region
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from fedfleet.core.errors import ConfigError

KINDS = ("local", "hosts", "cloud")
NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")
COORDS = re.compile(r"(-?\d+(?:\.\d+)?),(-?\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Site:
    """A participant as `init` was told: its name, where it is, its machines' addresses."""

    name: str
    location: str  # "cloud:region" or "lat,lon"
    addresses: tuple[str, ...] = ()  # hosts kind: its VMs' addresses


@dataclass(frozen=True)
class InitSpec:
    name: str
    kind: str
    sites: tuple[Site, ...]
    vms: int = 2  # per participant (local and cloud kinds)
    rounds: int = 3
    demo: bool = True  # the built-in digits (local kind only)
    data_path: str = ""  # own data: local kind, a folder with one sub-folder per site; else each site's path
    classes: tuple[str, ...] = ()
    image_size: int = 64
    channels: int = 1
    model: str = ""  # path/to/file.py:function
    app: str = ""  # a Flower app of your own: its directory (instead of the built-in app)
    app_rounds: bool = True  # the app has num-server-rounds (what --rounds sets)
    aggregator: str = ""  # hosts kind: its address
    ssh_user: str = "fedfleet"
    key_file: str = "~/.ssh/fedfleet_ed25519"
    operator_key: str = ""  # cloud kind: the public key's text
    operator_cidr: str = ""
    ports: tuple[int, ...] = field(default=())  # local kind: the aggregator's, then each VM's
    internal_port: int | None = None  # local kind: the SuperLink's own loopback port, behind the proxy

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ConfigError(
                f"stack name {self.name!r} must be lowercase letters, digits and '-', starting with a letter"
            )
        if self.kind not in KINDS:
            raise ConfigError(f"--kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if len(self.sites) < 2:
            raise ConfigError(
                "a federation needs at least two participants: give --participant NAME@LOCATION for each"
            )
        for site in self.sites:  # names are checked with the rest of the file, by its parser
            if not (COORDS.fullmatch(site.location) or site.location.count(":") == 1):
                raise ConfigError(
                    f"participant {site.name!r}: location {site.location!r} must be cloud:region "
                    "(e.g. aws:us-east-1, where the site's data is or near it) or lat,lon (e.g. 48.14,11.58)"
                )
            if self.kind == "hosts" and not site.addresses:
                raise ConfigError(
                    f"participant {site.name!r} has no machines: give --vm {site.name}=ADDRESS for each "
                    "machine it lends (a hosts stack is machines the sites already have)"
                )
        if self.kind == "hosts" and not self.aggregator:
            raise ConfigError("a hosts stack needs --aggregator ADDRESS: the machine that runs the SuperLink")
        if self.kind == "cloud" and not (self.operator_key and self.operator_cidr):
            raise ConfigError(
                "a cloud stack needs --operator-key (your SSH public key file) and --operator-cidr "
                "(the network you administer from, e.g. 203.0.113.7/32)"
            )
        if self.app and self.model:
            raise ConfigError(
                "give --app (a Flower app of your own) or --model (your network in the built-in app), not both"
            )
        if not self.demo and not self.classes and not self.app:
            raise ConfigError("with your own data, give --classes: the class names (the data's folder names)")
        if self.kind == "local" and not self.demo and not self.data_path:
            raise ConfigError(
                "with your own data on the local stack, give --data-path DIR: a folder with one "
                "sub-folder per participant (its images, a folder per class)"
            )


def _q(value: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is valid YAML)."""
    return json.dumps(value)


def _location(location: str) -> str:
    coords = COORDS.fullmatch(location)
    if coords:
        return f"{{lat: {coords[1]}, lon: {coords[2]}}}"
    cloud, region = location.split(":")
    return f"{{cloud: {cloud}, region: {region}}}"


def _site_cloud(location: str) -> tuple[str, str]:
    """The cloud and region a cloud-kind site's VMs go to: where its location says."""
    if COORDS.fullmatch(location):
        raise ConfigError(
            f"location {location!r}: in a cloud stack give the site's cloud and region "
            "(cloud:region): its VMs are created there"
        )
    cloud, region = location.split(":")
    return cloud, region


def render(spec: InitSpec) -> str:
    """The stack file's text."""
    out = [f"# {spec.name}: written by `fedfleet init --kind {spec.kind}`; edit freely. Every key is"]
    out.append("# documented in Pulumi.yaml; `fedfleet run --stack " + spec.name + "` runs it.")
    out += _header(spec)
    out.append("config:")
    if spec.kind == "hosts":
        out += [
            "  fedfleet:ssh:                       # how this machine logs in to every host",
            f"    user: {_q(spec.ssh_user)}",
            f"    keyFile: {_q(spec.key_file)}     # the private key, on this machine only",
        ]
    if spec.kind == "cloud":
        out += [
            "  fedfleet:operator:                  # you: the key the VMs accept, where you work from",
            f"    sshPublicKey: {_q(spec.operator_key)}",
            f"    cidr: {_q(spec.operator_cidr)}",
        ]
    out += _aggregator(spec)
    out.append("  fedfleet:participants:")
    ports = iter(spec.ports[1:])
    for site in spec.sites:
        out += _participant(spec, site, ports)
    if spec.kind == "local":
        if spec.demo:
            out += [
                "  fedfleet:data:",
                "    # The built-in demo: 8x8 digits split across the sites (nothing downloaded).",
                "    # For your own data: remove this, set app.classes and each participant's",
                "    # dataPath (its images, one folder per class), or `fedfleet init --data-path`.",
                "    demo: {partition: dirichlet, alpha: 1.0, seed: 42}",
            ]
        else:
            out += ["  fedfleet:data: {}                   # each site's data: dataPath above"]
    out += _app(spec)
    out += [
        "  fedfleet:orchestrator:              # which VMs may serve, and how long to wait",
        "    minVcpu: 2",
        "    minMemoryGib: 4",
        "    connectTimeoutSeconds: 60",
    ]
    if spec.kind == "local":
        out += [
            "  fedfleet:local:                     # every host emulated on this machine",
            f"    root: .fedfleet/{spec.name}",
        ]
    return "\n".join(out) + "\n"


def _header(spec: InitSpec) -> list[str]:
    if spec.kind == "local":
        return [
            "# Local: the aggregator and every VM are emulated on this machine (real Flower",
            "# processes on loopback); the placement is planned for the locations below.",
        ]
    if spec.kind == "hosts":
        return [
            "# Hosts: machines the sites already have, reached over SSH (no Pulumi, no cloud).",
            "#   fedfleet up --stack NAME     checks the file and the key, prints the inventory",
            "#   fedfleet vms --stack NAME    probes every VM (real vCPU, memory, free disk)",
        ]
    return [
        "# Cloud: `fedfleet plan` places the aggregator, `fedfleet up` creates the VMs with",
        "# Pulumi (each site's private network, reached through its SSH bastion).",
    ]


def _aggregator(spec: InitSpec) -> list[str]:
    out = ["  fedfleet:aggregator:"]
    if spec.kind == "hosts":
        out.append(f"    address: {_q(spec.aggregator)}        # where this machine reaches it over SSH")
        out.append("    port: 9443                         # the SuperLink's, opened to the sites only")
    elif spec.kind == "cloud":
        out.append("    # cloud, region and instanceType: written here by `fedfleet plan`")
        out.append("    port: 9443")
    else:
        out.append("    # the placement `fedfleet run` plans is emulated on this machine")
        out.append(
            f"    port: {spec.ports[0] if spec.ports else 9443}                # the proxy's: the Fleet API only"
        )
        if spec.internal_port is not None:
            out.append(
                f"    internalPort: {spec.internal_port}        # the SuperLink's own, on loopback: the operator's"
            )
    return out


def _short(spec: InitSpec, site: Site) -> str:
    """The stem of the site's VM names: its name's last word when that tells it apart
    (hospital-us -> us-vm-1), else its whole name."""
    last = site.name.split("-")[-1]
    others = [s.name.split("-")[-1] for s in spec.sites if s is not site]
    return last if last[:1].isalpha() and last not in others else site.name


def _participant(spec: InitSpec, site: Site, ports: object) -> list[str]:
    out = [f"    - name: {site.name}", f"      location: {_location(site.location)}"]
    short = _short(spec, site)
    if spec.kind == "local":
        out.append("      cloud: local")
        out.append(f"      region: {short}")
        if not spec.demo:
            out.append(
                f"      dataPath: {_q(f'{spec.data_path}/{site.name}')}   # its images: a folder per class"
            )
        out.append("      vms:")
        for i in range(1, spec.vms + 1):
            port = next(ports)  # type: ignore[call-overload]
            out.append(
                f"        - {{name: {short}-vm-{i}, vcpu: 2, memoryGib: 4, diskGib: 20, port: {port}}}"
            )
        return out
    out.append(
        f"      dataPath: {_q(spec.data_path or '/srv/fedfleet/data')}   # its data on its machines"
        " (never copied)"
    )
    if spec.kind == "hosts":
        out.append("      vms:")
        for i, address in enumerate(site.addresses, start=1):
            out.append(f"        - {{name: {short}-vm-{i}, address: {_q(address)}}}")
        return out
    cloud, region = _site_cloud(site.location)
    out[1:2] = [
        f"      cloud: {cloud}",
        f"      region: {region}",
        f"      location: {_location(site.location)}",
    ]
    out.append("      vms:                             # instance type: the catalog's cheapest fit")
    for i in range(1, spec.vms + 1):
        out.append(f"        - {{name: {short}-vm-{i}, vcpu: 2, memoryGib: 8, diskGib: 50}}")
    return out


def _app(spec: InitSpec) -> list[str]:
    if spec.app:
        return [
            "  fedfleet:app:                       # a Flower app of your own, deployed unchanged",
            f"    path: {_q(spec.app)}",
            "    config:                            # its run config ([tool.flwr.app.config]) to override",
            f"      num-server-rounds: {spec.rounds}" if spec.app_rounds else "      {}",
            "    nodeConfig: {}                     # more node config for every SuperNode; fedfleet sets",
            "                                       # participant, vm, data-path, partition-id, num-partitions",
        ]
    out = [
        "  fedfleet:app:                       # the training (fl/fedfleet_app/settings.py)",
        f"    num-server-rounds: {spec.rounds}",
        "    strategy: fedavg                   # or fedprox, fedadam, fedmedian, krum, ...",
        "    local-epochs: 2",
        "    learning-rate: 0.05",
    ]
    if not spec.demo or spec.kind != "local":
        out += [
            f"    classes: {json.dumps(list(spec.classes))}",
            f"    image-size: {spec.image_size}                     # images are resized to this",
            f"    channels: {spec.channels}                        # 1 grayscale, 3 RGB",
        ]
    if spec.model:
        out.append(
            f"    model: {_q(spec.model)}   # your network: function(num_classes, channels, image_size)"
        )
    else:
        out.append("    # model: models/mynet.py:build     # your own network instead of the built-in CNN")
    return out
