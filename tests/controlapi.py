"""What a participant can do with what its VM holds: the SuperLink's address and the stack's CA.

Used by the end-to-end tests of every kind of host: the loopback local stack, its
namespaces mode and the SSH lab. `inside` is a command prefix that runs the attempt where a
participant runs (`ip netns exec NAMESPACE`), or nothing on the loopback stack.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedfleet.adapters.flwr import FlwrCli

FIXTURE_APP = Path(__file__).parent / "fixtures" / "numpy-app"

# Plain HTTPS, as any program on the participant's VM could send: the Control API, the
# ServerApp runtime (unauthenticated in Flower's subprocess isolation) and the API docs
# through the address participants are given; then the SuperLink's own port directly.
_PROBE = r"""
import json, socket, ssl, sys, urllib.error, urllib.request
host, port, internal, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
context = ssl.create_default_context(cafile=ca)
out = {}
for method, path in (("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"),
                     ("POST", "/v1/control/list-nodes"), ("POST", "/v1/runtime/acquire-task"),
                     ("GET", "/docs"), ("GET", "/health")):
    request = urllib.request.Request(f"https://{host}:{port}{path}", method=method,
                                     data=b"" if method == "POST" else None,
                                     headers={"content-type": "application/protobuf"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            out[path] = response.status
    except urllib.error.HTTPError as err:
        out[path] = err.code
    except urllib.error.URLError as err:  # no answer at all: not a refusal, say what happened
        out[path] = f"no answer: {err.reason}"
if internal:
    try:
        socket.create_connection((host, internal), timeout=5).close()
        out["internal"] = "open"
    except OSError as err:
        out["internal"] = type(err).__name__
print(json.dumps(out))
"""


COMMANDS = ("flwr ls", "flwr run")


def participant_attempts(
    host: str,
    port: int,
    ca: Path,
    work: Path,
    inside: tuple[str, ...] = (),
    internal: int = 0,
    commands: tuple[str, ...] = COMMANDS,
) -> dict[str, Any]:
    """Status code per Control/runtime/docs path through `host:port`, whether the SuperLink's
    own port `internal` (if given) is reachable at `host`, and what `commands` (`flwr ls`,
    `flwr run`) answer a participant (their JSON replies)."""
    probe = subprocess.run(
        [*inside, sys.executable, "-c", _PROBE, host, str(port), str(internal), str(ca)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    out: dict[str, Any] = json.loads(probe.stdout)
    cli = FlwrCli(work / "participant-flwr", "superlink", f"{host}:{port}", ca)
    cli.write_config()
    app = work / "participant-app"
    if not app.exists():
        shutil.copytree(FIXTURE_APP, app)
    env = {**os.environ, "FLWR_HOME": str(cli.flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}  # fmt: skip
    flwr = str(Path(sys.executable).parent / "flwr")
    for name in commands:
        argv = ["ls"] if name == "flwr ls" else ["run", str(app)]
        done = subprocess.run(
            [*inside, flwr, *argv, "superlink", "--format", "json"],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )  # fmt: skip
        text = done.stdout + done.stderr
        try:
            out[name] = json.loads(done.stdout[done.stdout.index("{") :])
        except ValueError:
            out[name] = {"success": False, "error-message": text[-2000:]}
    return out


def assert_participant_refused(seen: dict[str, Any], *, internal_closed: bool) -> None:
    """Every control, runtime and docs path 403; `flwr ls` and `flwr run` refused (403);
    /health served; the SuperLink's own port closed where the host can tell (not on loopback).
    (That no run was created is checked where the run list is known: the loopback test.)"""
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/list-nodes",
                 "/v1/runtime/acquire-task", "/docs"):  # fmt: skip
        assert seen[path] == 403, (path, seen)
    assert seen["/health"] == 200, seen
    for command in COMMANDS:
        if command not in seen:
            continue
        reply = seen[command]
        # httpx's words for the proxy's answer (a port number or a path cannot pass for them)
        assert reply.get("success") is False and "403 Forbidden" in str(reply), (command, reply)
        assert not reply.get("run-id"), (command, reply)
    assert "flwr ls" in seen, seen
    if internal_closed:
        assert seen["internal"] == "ConnectionRefusedError", seen
