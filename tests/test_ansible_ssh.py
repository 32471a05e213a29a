"""The playbooks over real SSH: an aggregator and two participant VMs, each a network namespace
with its own sshd, and Ansible run from a controller namespace joined to them by a bridge.

Everything runs inside namespaces this test creates (addresses included) and is torn
down at the end: sshd and every process started in a namespace, then the namespaces.
Skipped, with the reason, where root, `ip netns` or sshd are missing (`.ci/run`
installs openssh-server).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedfleet import localstack, supervision
from fedfleet.adapters.pki import ensure_server_tls
from fedfleet.adapters.processes import ProcessGroup, terminate

from .conftest import running_processes_mentioning, why_no_namespaces

pytestmark = pytest.mark.e2e

SSHD = "/usr/sbin/sshd"
SUBNET = "10.213.97"  # inside the test's own namespaces only
HOSTS = {"agg": f"{SUBNET}.11", "vm1": f"{SUBNET}.12", "vm2": f"{SUBNET}.13"}
GHOST = f"{SUBNET}.99"  # in the subnet, but no namespace answers there
SUPERLINK_PORT = 9443


def _why_skip() -> str | None:
    if not Path(SSHD).exists():
        return "needs openssh-server (`apt-get install openssh-server`; .ci/run installs it)"
    why = why_no_namespaces()
    return f"network namespaces: {why}" if why else None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Lab:
    root: Path
    tag: str
    key: Path
    known_hosts: Path
    procs: ProcessGroup

    def ns(self, host: str) -> str:
        return f"ff{self.tag}-{host}"

    def controller(self, code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Python code run in the controller's namespace (where Ansible runs)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns("ctl"), sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def apply(self, playbook: str, inventory: dict[str, Any], limit: str | None = None) -> dict[str, Any]:
        """configure.apply in the controller namespace; the PlayResult or the failure as JSON."""
        path = self.root / f"inventory-{secrets.token_hex(3)}.json"
        path.write_text(json.dumps(inventory))
        code = (
            "import json, sys\n"
            "from fedfleet import configure\n"
            "inv = json.load(open(sys.argv[2]))\n"
            "try:\n"
            "    r = configure.apply(sys.argv[1], inv, limit=sys.argv[3] or None)\n"
            "    print(json.dumps({'ok': True, **r.to_dict()}))\n"
            "except configure.ConfigureFailed as err:\n"
            "    print(json.dumps({'ok': False, 'error': str(err)}))\n"
        )
        done = self.controller(code, playbook, str(path), limit or "")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    def home(self, host: str) -> Path:
        return self.root / "hosts" / host

    def supervisor(self, host: str) -> supervision.HostStatus:
        return supervision.status(host, localstack.socket_path(self.home(host), "supervisor"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = _why_skip()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("ssh-lab")
    tag = secrets.token_hex(2)
    lab = Lab(root, tag, root / "id_ed25519", root / "known_hosts", ProcessGroup())
    namespaces = [lab.ns(h) for h in ("ctl", *HOSTS)]
    try:
        for ns in namespaces:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ctl = lab.ns("ctl")
        ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        ip("-n", ctl, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        ip("-n", ctl, "link", "set", "br0", "up")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(lab.key)], check=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for host, address in HOSTS.items():
            ns = lab.ns(host)
            ip(
                "link",
                "add",
                f"v{tag}{host}",
                "netns",
                ctl,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            ip("-n", ctl, "link", "set", f"v{tag}{host}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            etc = root / "sshd" / host
            etc.mkdir(parents=True)
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "host_key")], check=True
            )
            (etc / "sshd_config").write_text(
                f"ListenAddress {address}\nPort 22\nHostKey {etc / 'host_key'}\nPidFile {etc / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {lab.key}.pub\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            )
            lab.procs.start(
                f"sshd {host}",
                ["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", str(etc / "sshd_config")],
                dict(os.environ),
                root / "logs" / f"sshd-{host}.log",
            )
        for address in HOSTS.values():  # sshd is up when it accepts a connection (deadline 30 s)
            _wait_for_ssh(lab, address)
        yield lab
    finally:
        lab.procs.stop_all()
        for ns in namespaces:  # every process left in a namespace (supervisors, Flower, ssh masters)
            listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
            terminate({int(p) for p in listed.stdout.split()}, 10)
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _wait_for_ssh(lab: Lab, address: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(
            ["ip", "netns", "exec", lab.ns("ctl"), "ssh", *_ssh_options(lab), "-o", "BatchMode=yes",
             f"root@{address}", "true"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, f"sshd at {address} did not accept a login: {done.stderr}"
        time.sleep(0.2)


def _ssh_options(lab: Lab, key: Path | None = None) -> list[str]:
    return [
        "-i", str(key or lab.key), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={lab.known_hosts}",
        "-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=5",
    ]  # fmt: skip


def _inventory(lab: Lab, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What configure.ansible_inventory makes for cloud VMs, pointed at the namespace hosts,
    with the supervisor (no systemd here) and the controller's Python environment."""
    pki = lab.root / "pki"
    ca = ensure_server_tls(pki, [HOSTS["agg"], "127.0.0.1", "localhost"], "ssh-lab").ca_cert
    operator = lab.root / "operator"
    operator.mkdir(exist_ok=True)
    (operator / "config.toml").write_text(
        f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "{HOSTS["agg"]}:{SUPERLINK_PORT}"\n'
        f'root-certificates = "{ca}"\n'
    )

    def host(name: str, address: str) -> dict[str, Any]:
        home = lab.home(name)
        return {
            "ansible_host": address,
            "flower_common_home": str(home),
            "flower_common_supervisor_socket": str(localstack.socket_path(home, "supervisor")),
        }

    vms = {
        name: host(name, HOSTS[name])
        | {
            "flower_supernode_participant": f"site-{name}",
            "flower_supernode_data_path": str(lab.root / "data" / name),
        }
        for name in ("vm1", "vm2")
    }
    for name in vms:
        (lab.root / "data" / name).mkdir(parents=True, exist_ok=True)
    for name, extra in (overrides or {}).items():
        vms.setdefault(name, {}).update(extra)
    return {
        "all": {
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(lab.key),
                "ansible_ssh_common_args": " ".join(_ssh_options(lab)[2:]),
                "ansible_python_interpreter": "/usr/bin/python3"
                if Path("/usr/bin/python3").exists()
                else sys.executable,
                "flower_common_venv": sys.prefix,
                "flower_common_install": False,
                "flower_common_create_user": False,
                "flower_common_service_manager": "supervisor",
                "flower_superlink_tls_src": str(pki),
                "flower_superlink_port": SUPERLINK_PORT,
                "flower_supernode_superlink": f"{HOSTS['agg']}:{SUPERLINK_PORT}",
                "flower_supernode_ca_cert_src": str(ca),
                "flower_supernode_public_keys_dir": str(pki / "node-keys"),
                "flower_supernode_flwr_bin": str(Path(sys.executable).with_name("flwr")),
                "flower_supernode_flwr_home": str(operator),
                "flower_supernode_connection": "lab",
                "flower_supernode_worker_enabled": False,
            },
            "children": {
                "aggregator": {
                    "hosts": {"agg": host("agg", HOSTS["agg"]) | {"flower_superlink_host": HOSTS["agg"]}}
                },
                "supernodes": {"hosts": vms},
            },
        }
    }


def _online_nodes(lab: Lab) -> list[dict[str, Any]]:
    code = (
        "import subprocess, sys, os\n"
        "env = dict(os.environ, FLWR_HOME=sys.argv[1])\n"
        "out = subprocess.run([sys.argv[2], 'supernode', 'list', 'lab', '--format', 'json'], env=env,"
        " capture_output=True, text=True).stdout\n"
        "print(out[out.index('{'):])\n"
    )
    done = lab.controller(code, str(lab.root / "operator"), str(Path(sys.executable).with_name("flwr")))
    assert done.returncode == 0, done.stderr
    return [n for n in json.loads(done.stdout)["nodes"] if n["status"] == "online"]


def _wait_online(lab: Lab, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(nodes := _online_nodes(lab)) < count:
        assert time.monotonic() < deadline, f"only {len(nodes)} SuperNodes online: {nodes}"
        time.sleep(1)
    return nodes


def test_playbooks_over_ssh_run_the_services_and_a_second_run_changes_nothing(lab: Lab):
    first = lab.apply("site.yml", _inventory(lab))
    assert first["ok"], first.get("error")
    assert set(first["hosts"]) == {"agg", "vm1", "vm2"}
    assert first["changed"] > 0 and all(h.get("failures", 0) == 0 for h in first["hosts"].values())
    assert lab.supervisor("agg").programs == {"flower-superlink": "RUNNING"}
    for vm in ("vm1", "vm2"):
        assert lab.supervisor(vm).programs == {"flower-supernode": "RUNNING"}
    # Each SuperNode reached the SuperLink across the namespaces, with its registered key.
    assert len(_wait_online(lab, 2)) == 2
    # The node keys were made on the VMs; only their public halves reached the controller.
    for vm in ("vm1", "vm2"):
        assert (lab.home(vm) / "supernode" / "node_key").stat().st_mode & 0o077 == 0
        assert (lab.root / "pki" / "node-keys" / f"{vm}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")

    second = lab.apply("site.yml", _inventory(lab))
    assert second["ok"], second.get("error")
    assert second["changed"] == 0, second["hosts"]


def test_bad_hosts_fail_alone_and_leave_the_others_running(lab: Lab):
    wrong_key = lab.root / "wrong_key"
    if not wrong_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong_key)], check=True)
    inventory = _inventory(
        lab,
        {
            "vm2": {"flower_supernode_data_path": str(lab.root / "data" / "nowhere")},
            "ghost": {"ansible_host": GHOST, "flower_supernode_participant": "site-ghost",
                      "flower_supernode_data_path": "/data"},
            # Its own connection (no shared ControlMaster to vm1), so sshd sees the wrong key.
            "badkey": {"ansible_host": HOSTS["vm1"], "ansible_ssh_private_key_file": str(wrong_key),
                       "ansible_ssh_args": "-o ControlMaster=no",
                       "flower_supernode_participant": "site-badkey", "flower_supernode_data_path": "/data"},
        },
    )  # fmt: skip
    result = lab.apply("site.yml", inventory, limit="supernodes")
    assert not result["ok"]
    error = result["error"]
    assert "failed on 3 host(s)" in error
    assert (
        f"participant site-vm2: the data path {lab.root / 'data' / 'nowhere'} does not exist on vm2" in error
    )
    assert "ghost: unreachable" in error
    assert "badkey: unreachable" in error and "Permission denied" in error
    assert not any(line.strip().startswith("vm1:") for line in error.splitlines())
    # The good VM and the one whose check failed keep running what they ran before.
    for vm in ("vm1", "vm2"):
        assert lab.supervisor(vm).programs == {"flower-supernode": "RUNNING"}


def test_a_port_in_use_on_a_vm_is_named(lab: Lab):
    stopped = lab.apply("stop.yml", _inventory(lab), limit="vm2")
    assert stopped["ok"], stopped.get("error")
    squatter = lab.procs.start(
        "squatter",
        ["ip", "netns", "exec", lab.ns("vm2"), sys.executable, "-c",
         "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 9094)); s.listen(); time.sleep(300)"],
        dict(os.environ),
        lab.root / "logs" / "squatter.log",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while (
            "127.0.0.1:9094"
            not in subprocess.run(
                ["ip", "netns", "exec", lab.ns("vm2"), "ss", "-ltn"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        ):
            assert time.monotonic() < deadline, "the squatter did not start listening"
            time.sleep(0.1)
        result = lab.apply("site.yml", _inventory(lab), limit="vm2")
        assert not result["ok"]
        assert "port 9094 on vm2 is already in use by another program" in result["error"]
    finally:
        terminate({squatter.pid}, 5)
    assert lab.supervisor("vm1").programs == {"flower-supernode": "RUNNING"}


def test_stop_leaves_nothing_running(lab: Lab):
    stopped = lab.apply("stop.yml", _inventory(lab))
    assert stopped["ok"], stopped.get("error")
    deadline = time.monotonic() + 30
    while left := running_processes_mentioning(str(lab.root / "hosts")):
        assert time.monotonic() < deadline, left
        time.sleep(0.2)
    assert not lab.supervisor("agg").reachable
