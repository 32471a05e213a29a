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


def results(aggregator: Host, server_out: str, run_dir: Path) -> list[str]:
    """The ServerApp's output directory (on the aggregator) into the run directory, through
    a scratch directory: what it sends may not replace what fedfleet writes there. The
    names it sent that were refused (the run's own files)."""
    with tempfile.TemporaryDirectory(prefix="fedfleet-results-", dir=run_dir) as tmp:
        if not aggregator.fetch(server_out, Path(tmp)):
            return []
        refused = []
        for entry in sorted(Path(tmp).iterdir()):
            if entry.name in OWN or (run_dir / entry.name).exists():
                refused.append(entry.name)
                continue
            entry.rename(run_dir / entry.name)
        return refused


def logs(hosts: Mapping[str, Host], names: Iterable[str], run_dir: Path) -> list[str]:
    """Each host's service logs into `run_dir/logs/`; the hosts whose logs could not be copied."""
    target = run_dir / "logs"
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
