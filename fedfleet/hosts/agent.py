"""What fedfleet asks of a host, answered on the host itself: standard library only.

On an SSH host this file runs as a small agent under the host's own Python, over the
host's one multiplexed SSH connection (`hosts.ssh`): it reads one JSON request per line
on stdin and writes one JSON answer per line on stdout, and exits when stdin closes
(the connection ended). The local stack calls the same functions in-process
(`hosts.local`), so both kinds of host answer the same questions the same way:

    status   the state and pid of each program (supervisord over its Unix socket, or systemd)
    read     bytes of a file from an offset (logs, the ServerApp's events)
    write    a file, atomically (what the runner tells the ServerApp)

Runs on Python 3.8 and later (hosts may be older than the controller).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import socket
import subprocess
import sys
import time
import xmlrpc.client

RUNNING_STATES = ("RUNNING", "STARTING", "BACKOFF")
READ_LIMIT = 4 * 2**20  # bytes per read: a caller reads on from where it got to
IDLE_SECONDS = 30.0  # without a request for this long the agent exits (the controller pings)
# systemd's ActiveState, in supervisord's words (what the runner reads).
SYSTEMD_STATES = {
    "active": "RUNNING",
    "reloading": "RUNNING",
    "activating": "STARTING",
    "deactivating": "STOPPING",
    "failed": "FATAL",
    "inactive": "STOPPED",
}


class _DeadlineSocket(socket.socket):
    """A socket whose every send and receive ends at one deadline: a per-operation
    timeout alone lets a supervisor that answers a byte at a time take much longer
    than the controller waits for the answer."""

    deadline = 0.0

    def _left(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")  # an OSError, as the socket's own
        self.settimeout(left)

    def sendall(self, *args, **kwargs):
        self._left()
        return super().sendall(*args, **kwargs)

    def recv_into(self, *args, **kwargs):
        self._left()
        return super().recv_into(*args, **kwargs)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = _DeadlineSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.deadline = time.monotonic() + self.timeout
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    # supervisor's own transport has no timeout; a hung supervisor must not hang the caller.
    def __init__(self, path, timeout):
        super().__init__()
        self.unix_path = path
        self.timeout = timeout

    def make_connection(self, host):
        return _UnixConnection(self.unix_path, self.timeout)


def supervisor_status(socket_path, timeout=3.0):
    """{"answered", "programs": {name: state}, "pids": {name: pid}} from supervisord, or
    not answered when it has not answered within `timeout` seconds in all."""
    proxy = xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=_UnixTransport(socket_path, timeout))
    try:
        infos = proxy.supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error, http.client.HTTPException):
        return {"answered": False, "programs": {}, "pids": {}}
    return {
        "answered": True,
        "programs": {str(i["name"]): str(i["statename"]) for i in infos},
        "pids": {str(i["name"]): int(i["pid"]) for i in infos},
    }


def systemd_status(units, timeout=3.0):
    """The same answer from systemd, for the given units (names without .service)."""
    argv = ["systemctl", "show", "--property=Id,LoadState,ActiveState,MainPID"] + [
        u + ".service" for u in units
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {"answered": False, "programs": {}, "pids": {}}
    if done.returncode != 0:
        return {"answered": False, "programs": {}, "pids": {}}
    programs, pids = {}, {}
    for block in done.stdout.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        name = fields.get("Id", "").rsplit(".service", 1)[0]
        if not name:
            continue
        state = fields.get("ActiveState", "")
        if state == "inactive" and fields.get("LoadState") == "not-found":
            continue
        programs[name] = SYSTEMD_STATES.get(state, state.upper())
        pids[name] = int(fields.get("MainPID") or 0)
    return {"answered": True, "programs": programs, "pids": pids}


def read(path, offset=0, limit=READ_LIMIT):
    """{"size": bytes in the file (-1: missing), "data": base64 of up to `limit` bytes from
    `offset` (from 0 when the file is now shorter than `offset`: it was rotated)}."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(offset if offset <= size else 0)
            data = fh.read(limit)
    except OSError:
        return {"size": -1, "data": ""}
    return {"size": size, "data": base64.b64encode(data).decode()}


def _owner_of_nearest(path):
    """(uid, gid) of the nearest entry of `path` or its parents that exists, not following
    a link (a link's owner is whoever made it)."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    found = os.lstat(existing)
    return found.st_uid, found.st_gid


def _as_owner(path, work):
    """Run `work()` as the owner of the nearest existing part of `path` when the agent runs
    as root (under sudo on a systemd host): what it creates then belongs to the services'
    account, and a link that account planted cannot lead root anywhere that account could
    not go itself. Otherwise (or when that owner is root) just run it."""
    if os.geteuid() != 0:
        return work()
    uid, gid = _owner_of_nearest(os.path.dirname(path) or ".")
    if uid == 0:
        return work()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the owner, do the work, report how it went
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            work()
        except BaseException as err:  # reported to the parent as text
            os.write(write_end, f"{type(err).__name__}: {err}".encode()[:4000])
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        message = fh.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise OSError(message or f"writing {path} as uid {uid} failed")
    return None


def write(path, data, mode=0o644):
    """Write base64 `data` to `path` atomically (a sibling temporary file, then rename),
    creating missing directories; as root, as the owner of where it goes (`_as_owner`)."""

    def work():
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, "." + os.path.basename(path) + "." + str(os.getpid()) + ".tmp")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags, mode)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(base64.b64decode(data))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise

    _as_owner(path, work)
    return {}


def service_manager(socket_path):
    """What runs fedfleet's services here: fedfleet's supervisor (its socket exists), else
    systemd where the host runs it, else the supervisor (which is then not running)."""
    if socket_path and os.path.exists(socket_path):
        return "supervisor"
    return "systemd" if os.path.isdir("/run/systemd/system") else "supervisor"


def status(manager, socket_path="", units=(), timeout=3.0):
    if manager == "auto":
        manager = service_manager(socket_path)
    if manager == "systemd":
        return systemd_status(list(units), timeout)
    return supervisor_status(socket_path, timeout)


OPERATIONS = {"status": status, "read": read, "write": write, "ping": lambda: {"pid": os.getpid()}}


def answer(request):
    """One request (a dict with "op" and its arguments) -> its answer, never raising."""
    rid = request.pop("id", None)
    op = OPERATIONS.get(request.pop("op", ""))
    try:
        if op is None:
            raise ValueError("unknown operation")
        reply = op(**request)
        reply["ok"] = True
    except Exception as err:
        reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    reply["id"] = rid
    return reply


def requests(fd, idle=IDLE_SECONDS):
    """The request lines arriving on file descriptor `fd`, each as soon as it is complete;
    ends when the input closes or nothing has come for `idle` seconds.

    Read from the descriptor itself, never through a buffered file: `select` sees only
    what is still in the pipe, so a second request that a buffered readline had already
    pulled in with the first would wait for a third (or for the idle exit)."""
    pending = b""
    while True:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                yield line
        ready, _, _ = select.select([fd], [], [], idle)
        if not ready:
            return  # the controller went quiet
        chunk = os.read(fd, 65536)
        if not chunk:
            return  # the session ended
        pending += chunk


def serve(stdin=None, stdout=None, idle=IDLE_SECONDS):
    """Answer requests until stdin closes (the SSH session ended) or nothing has come for
    `idle` seconds: the controller pings every few seconds, so silence means it is gone
    (its connection may be half-open: a cut link, a killed controller) and the agent
    leaves nothing behind on the host. The session boots the agent reading its source
    unbuffered (`hosts.ssh.BOOT`), so no request can be stuck in a buffer of sys.stdin."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    hello = {
        "id": 0,
        "ok": True,
        "ready": True,
        "python": sys.version.split()[0],
        "uid": os.getuid(),
        "systemd": os.path.isdir("/run/systemd/system"),
    }
    stdout.write(json.dumps(hello) + "\n")
    stdout.flush()
    for line in requests(stdin.fileno(), idle):
        try:
            request = json.loads(line)
        except ValueError:
            request = {"op": ""}
        if not isinstance(request, dict):
            request = {"op": ""}
        stdout.write(json.dumps(answer(request)) + "\n")
        stdout.flush()


if __name__ == "__main__":
    serve()
