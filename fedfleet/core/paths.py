"""Where fedfleet keeps a stack's state on the operator's machine, and the stack's lock.

One directory per stack: `fedfleet:local.root` for the local stack (default
`.fedfleet/<stack>`), `.fedfleet/<stack>` for every other kind.

    pki/          ca.crt ca.key superlink.crt superlink.key node-keys/<vm>.pub
    operator/     flwr-home/config.toml      (the operator's `flwr` CLI connection)
    known_hosts   the SSH host keys of the stack's hosts (first contact, or pinned)
    inventory.json rotation.json site.json stop.json probe.json  lock  pids.json

and on the local stack the emulated hosts' disks:

    aggregator/   superlink/ supervisor/ log/ runs/<run-id>/
    vms/<vm>/     supernode/ supervisor/ log/
    sites/<participant>/data/                (default data paths)

The wheel cache for hosts that install offline is shared by every stack of a project:
`.fedfleet/wheels/`; so are the environments of Flower apps of your own that the local stack's
hosts run: `.fedfleet/appenvs/<key>/`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedfleet.core.errors import EnvironmentProblem
from fedfleet.core.stack import StackConfig

# Linux limits a Unix socket path to 107 bytes.
MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class StackPaths:
    root: Path
    project: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def node_keys(self) -> Path:
        return self.root / "pki" / "node-keys"

    @property
    def operator_home(self) -> Path:
        return self.root / "operator" / "flwr-home"

    @property
    def pidfile(self) -> Path:
        return self.root / "pids.json"

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.json"

    @property
    def rotation(self) -> Path:
        return self.root / "rotation.json"

    @property
    def wheels(self) -> Path:
        return self.project / ".fedfleet" / "wheels"

    def app_env(self, key: str) -> Path:
        """The local stack's environment for a Flower app's dependencies (shared by stacks)."""
        return self.project / ".fedfleet" / "appenvs" / key

    def report(self, playbook: str) -> Path:
        """The last result of a playbook (site.json, stop.json, probe.json)."""
        return self.root / f"{Path(playbook).stem}.json"

    # -- the local stack's emulated hosts --------------------------------------------

    @property
    def aggregator(self) -> Path:
        return self.root / "aggregator"

    def vm_home(self, vm: str) -> Path:
        return self.root / "vms" / vm

    def runs(self) -> Path:
        return self.project / "runs"


def stack_paths(stack: StackConfig, project_dir: Path) -> StackPaths:
    if stack.local is not None:
        root = Path(stack.local.root.format(stack=stack.name))
        return StackPaths(root if root.is_absolute() else project_dir / root, project_dir)
    return StackPaths(project_dir / ".fedfleet" / stack.name, project_dir)


def known_hosts(stack: StackConfig, project_dir: Path, setting: str) -> Path:
    """A host's known_hosts file (`ssh.knownHostsFile`, relative to the project)."""
    path = Path(setting.format(stack=stack.name)).expanduser()
    return path if path.is_absolute() else project_dir / path


def data_path(stack: StackConfig, project_dir: Path, participant: str) -> Path:
    """A local participant's data directory (relative paths are under the stack root)."""
    path = Path(stack.participant(participant).data_path)
    return path if path.is_absolute() else stack_paths(stack, project_dir).root / path


def private_dir(name: str) -> Path:
    """A 0700 directory of this user's for short socket paths (/tmp/fedfleet-<uid>/<name>)."""
    base = Path("/tmp") / f"fedfleet-{os.getuid()}"  # noqa: S108 (0700, checked below)
    base.mkdir(mode=0o700, exist_ok=True)
    if base.stat().st_uid != os.getuid() or base.stat().st_mode & 0o077:
        raise EnvironmentProblem(f"{base} must be a 0700 directory owned by this user")
    path = base / name
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def socket_path(home: Path, name: str) -> Path:
    """`<home>/<name>.sock`, or a socket in a private 0700 directory when that path is too long."""
    path = home / f"{name}.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    return private_dir("sockets") / f"{hashlib.sha256(str(home).encode()).hexdigest()[:16]}-{name}.sock"


@contextmanager
def locked(paths: StackPaths) -> Iterator[None]:
    """Only one fedfleet command at a time may drive a stack (its hosts, its state)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise EnvironmentProblem(
                f"the stack at {paths.root} is in use by pid {holder}; wait for that fedfleet "
                "command to finish (or stop it) and try again"
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
