"""Collect: the run's results and logs back on the controller, in `runs/<run-id>/`.

From the aggregator: what the ServerApp wrote (every round's model, model.json,
events.jsonl, fleet.json); from every host the run used: its services' logs, as
`logs/<host>-<log>`. Copied from each host the way it is reached (a local copy, or a
tar stream over its SSH connection). Then summary.json, written atomically.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedfleet.core.errors import FedfleetError
from fedfleet.core.util import atomic_write
from fedfleet.hosts.base import Host

# What fedfleet itself writes in a run directory: what the aggregator sends is never
# allowed to take these names.
APP_OUTPUT = "output"  # a Flower app of your own: its ServerApp's working directory
SERVERAPP_LOG = "serverapp.log"  # and its output, as the SuperLink kept it
OWN = frozenset({"summary.json", "run_config.toml", "logs", SERVERAPP_LOG})


MERGED = ("models", "checkpoints")  # an attempt's files join the run's own


def merge(aggregator: Host, server_out: str, run_dir: Path, attempt: int, events: str) -> list[str]:
    """An attempt of a resumed run into the run's directory, replacing nothing: its models and
    checkpoints join the run's, its events become `events` (one file per attempt), the rest
    goes to `attempt-<n>/` (attempt 1: the run directory itself). What was already there."""
    kept = []
    with tempfile.TemporaryDirectory(prefix="fedfleet-results-", dir=run_dir) as tmp:
        if not aggregator.fetch(server_out, Path(tmp)):
            return []
        for entry in sorted(Path(tmp).iterdir()):
            if entry.name in MERGED and entry.is_dir():
                (run_dir / entry.name).mkdir(exist_ok=True)
                for file in sorted(entry.iterdir()):
                    target = run_dir / entry.name / file.name
                    if entry.name == "checkpoints" and file.suffix == ".json" and not target.exists():
                        # A commit is its pair: the manifest's .npz replaces an orphan cut short.
                        npz = file.with_suffix(".npz")
                        if npz.exists():
                            npz.replace(target.with_suffix(".npz"))
                        file.rename(target)
                    elif not file.exists():
                        continue  # moved with its manifest
                    elif target.exists():
                        kept.append(f"{entry.name}/{file.name}")
                    elif not (
                        entry.name == "checkpoints" and file.suffix == ".npz"
                    ):  # a lone .npz: cut short
                        file.rename(target)
                continue
            if entry.name == "events.jsonl":
                target = run_dir / events
            elif attempt == 1:
                target = run_dir / entry.name
            else:
                (run_dir / f"attempt-{attempt}").mkdir(exist_ok=True)
                target = run_dir / f"attempt-{attempt}" / entry.name
            if entry.name in OWN or target.exists():
                kept.append(entry.name)
            else:
                entry.rename(target)
    return kept


def logs(hosts: Mapping[str, Host], names: Iterable[str], run_dir: Path, into: str = "logs") -> list[str]:
    """Each host's service logs into `run_dir/<into>/`; the hosts whose logs could not be copied."""
    target = run_dir / into
    target.mkdir(parents=True, exist_ok=True)
    problems = []
    for name in dict.fromkeys(names):
        host = hosts[name]
        with tempfile.TemporaryDirectory(prefix="fedfleet-logs-") as tmp:
            try:
                if not host.fetch(f"{host.home.rstrip('/')}/log", Path(tmp)):
                    continue
            except FedfleetError as err:
                problems.append(f"{name}: {err}")
                continue
            for log in sorted(Path(tmp).glob("*.log*")):
                shutil.move(log, target / f"{name}-{log.name}")
    return problems


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    return atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
