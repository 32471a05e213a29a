"""The VM's warm worker: torch imported once, the site's data loaded once.

Flower starts a fresh ClientApp process for every message. Importing torch there
costs ~3 s of CPU per message per SuperNode (and constructing a torch.optim
optimizer another ~2 s, see task._sgd_step); three SuperNodes sharing two cores
spent more time importing than training. The worker is started beside the
SuperNode on the same VM, as the same user, and listens on a Unix socket (mode
0600, HMAC challenge with a per-VM key): nothing is reachable from the network.
The ClientApp sends it the received weights and gets back the trained weights;
the data never leaves the VM either way.

If the worker is not running (a bare `flwr run`, the simulation engine, a
crash), the ClientApp computes in-process with the same code (compute.py).

    python -m fedfleet_app.worker --socket PATH --key-file PATH
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from .settings import AppSettings

# The modules a worker executes for the ClientApp. A request carries the hash of
# the ClientApp's copies (from the FAB); a worker started from other code refuses
# it and the ClientApp computes in-process, so a stale worker never trains.
CODE_FILES = ("compute.py", "task.py", "data.py", "settings.py", "worker.py")


def code_version() -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in CODE_FILES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


class WorkerUnavailable(Exception):
    """No worker answered; compute in-process instead."""


def ensure_key(path: Path) -> bytes:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def handle(request: dict[str, Any]) -> dict[str, Any]:
    from . import compute, task

    settings = AppSettings.from_run_config(request["run_config"])
    if settings.model and request.get("model_file"):  # this process is not started from the app
        task.use_model_file(settings.model, str(request["model_file"]))
    if request["op"] == "train":
        return compute.run_train(
            request["data_path"],
            settings,
            request["weights"],
            evaluate_received=bool(request["evaluate_received"]),
            proximal_mu=float(request["proximal_mu"]),
            server_round=int(request["server_round"]),
        )
    if request["op"] == "evaluate":
        return compute.run_evaluate(request["data_path"], settings, request["weights"])
    raise ValueError(f"unknown op {request['op']!r}")


def serve(socket_path: Path, key: bytes) -> None:
    from . import compute  # noqa: F401 (import torch now, not at the first message)

    socket_path.unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        listener = Listener(str(socket_path), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old_umask)
    version = code_version()
    print(f"fedfleet worker ready on {socket_path} (code {version[:12]})", flush=True)
    with listener:
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError, EOFError):  # wrong key, or the client left
                continue
            with conn:
                try:
                    request = conn.recv()
                except (EOFError, OSError):
                    continue
                if request.get("code") != version:
                    reply = {"ok": False, "stale": True, "error": f"worker runs code {version[:12]}"}
                    conn.send(reply)
                    continue
                try:
                    reply = {"ok": True, "result": handle(request)}
                except Exception as err:  # reported to the ClientApp, which raises it
                    reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                try:
                    conn.send(reply)
                except OSError:
                    continue


def call(socket_path: str, key_file: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request; raise WorkerUnavailable if no worker is there to take it."""
    if not socket_path or not Path(socket_path).exists():
        raise WorkerUnavailable(f"no worker socket at {socket_path!r}")
    try:
        key = Path(key_file).read_text().strip().encode()
        conn = Client(socket_path, family="AF_UNIX", authkey=key)
    except (AuthenticationError, OSError, EOFError) as err:
        raise WorkerUnavailable(f"worker at {socket_path} did not answer: {err}") from err
    with conn:
        try:
            conn.send({**request, "code": code_version()})
            if not conn.poll(timeout):
                raise TimeoutError(f"worker at {socket_path} took longer than {timeout:.0f} s")
            reply = conn.recv()
        except (EOFError, OSError) as err:
            raise WorkerUnavailable(f"worker at {socket_path} went away: {err}") from err
    if reply.get("stale"):
        raise WorkerUnavailable(f"{reply['error']}, not this app's")
    if not reply["ok"]:
        raise RuntimeError(reply["error"])
    return dict(reply["result"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--key-file", required=True, type=Path)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the cleanup below
    try:
        serve(args.socket, ensure_key(args.key_file))
    except KeyboardInterrupt:
        pass
    finally:
        args.socket.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
