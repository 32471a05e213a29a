"""Resume: continue a run whose runner, aggregator or SuperLink was killed, from its last
committed round.

The built-in ServerApp commits every round before the next starts
(`checkpoints/round-K.npz`: the global weights and the strategy's server state, then its
manifest `round-K.json` with the .npz's SHA-256; both written then renamed). A resumed run
is a new attempt of the same run ID: the run's earlier output is fetched from the aggregator
if the runner died before collecting it, the newest checkpoint whose manifest vouches for it
is sent to the aggregator, and the ServerApp goes on with round K+1, on the same VMs or
others. Its output is merged into `runs/<run-id>/` (models and checkpoints of the new rounds,
the events appended), so every round appears exactly once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfleet_app.settings import AppSettings, SettingsError

from fedfleet.core.errors import ConfigError, FedfleetError
from fedfleet.core.records import RunState
from fedfleet.core.stack import StackConfig
from fedfleet.core.util import closest
from fedfleet.hosts.base import Host, read_whole

CHECKPOINTS = "checkpoints"
EVENTS = "events.jsonl"
IDENTITY = "run.json"  # what a run was started as: the stack, the model file's digest
KEEP = 2  # commits kept here per run (the aggregator keeps as many)
IGNORED_SETTINGS = ("output-dir", "resume-from", "num-server-rounds")


class CheckpointProblem(FedfleetError):
    """A checkpoint cannot be used; the message names the file and the fix."""


@dataclass
class Resumption:
    """What a resumed attempt starts from."""

    run_id: str
    run_dir: Path
    attempt: int  # this attempt's number: 2 for the first resume
    rounds: int  # how many rounds the run is to have in all
    previous: dict[str, Any] | None  # the last summary.json (None: the runner died before one)
    done: int = 0  # the last committed round
    checkpoint: Path | None = None
    skipped: list[str] = field(default_factory=list)  # newer checkpoints that could not be used
    unreachable: list[str] = field(default_factory=list)  # earlier output that could not be fetched
    seeded: list[dict[str, Any]] = field(default_factory=list)  # the earlier events kept


def server_dir(home: str, run_id: str, attempt: int) -> str:
    """An attempt's output directory on the aggregator (the first: runs/<run-id>)."""
    base = f"{home.rstrip('/')}/runs/{run_id}"
    return base if attempt == 1 else f"{base}.{attempt}"


def check(
    stack: StackConfig, project_dir: Path, run_id: str, settings: AppSettings, rounds: int | None
) -> Resumption:
    """Before any host is touched: the run exists, did not complete, ran on this stack, with
    the same app and settings; it is to have `rounds` rounds (default: as it started with)."""
    runs = project_dir / "runs"
    run_dir = runs / run_id
    if not run_id or not run_dir.is_dir() or run_dir.name != run_id:
        known = (
            sorted(p.name for p in runs.iterdir() if (p / "run_config.toml").exists())
            if runs.is_dir()
            else []
        )
        raise ConfigError(f"--resume {run_id}: no such run under {runs}; {closest(run_id, known)}")
    if stack.flower_app is not None:
        raise ConfigError(
            f"--resume {run_id}: stack {stack.name!r} runs a Flower app of your own, whose server state fedfleet "
            "does not know; only the built-in app's runs resume (start a new run instead)"
        )
    previous = _read_json(run_dir / "summary.json")
    if previous is not None:
        if previous.get("stack") != stack.name:
            raise ConfigError(
                f"--resume {run_id}: that run was on stack {previous.get('stack')!r}: pass --stack {previous.get('stack')}"
            )
        if previous.get("status") == "completed":
            raise ConfigError(
                f"--resume {run_id}: it completed all {previous.get('rounds_completed')} rounds: nothing to resume "
                "(start a new run, or resume with more --rounds only a run that stopped)"
            )
    config_file = run_dir / "run_config.toml"
    if not config_file.exists():
        raise ConfigError(
            f"--resume {run_id}: it never started training ({config_file} is missing): nothing to resume"
        )
    try:
        before = AppSettings.from_run_config(tomllib.loads(config_file.read_text())).to_run_config()
    except (tomllib.TOMLDecodeError, SettingsError, OSError) as err:
        raise ConfigError(f"--resume {run_id}: {config_file} cannot be read ({err})") from err
    now = settings.to_run_config()
    changed = [
        f"{key} was {before[key]!r}, is now {now.get(key)!r}"
        for key in before
        if key not in IGNORED_SETTINGS and before[key] != now.get(key)
    ]
    if changed:
        raise ConfigError(
            f"--resume {run_id}: the stack's app settings changed since that run ({'; '.join(changed)}): "
            f"a run resumes only with the settings it started with; restore {stack.path} or start a new run"
        )
    planned = int(before["num-server-rounds"])
    if rounds is not None and rounds < planned:
        raise ConfigError(f"--resume {run_id}: it was to run {planned} rounds; --rounds {rounds} is fewer")
    identity = _read_json(run_dir / IDENTITY)
    if identity is not None:
        if identity.get("stack") != stack.name:
            raise ConfigError(
                f"--resume {run_id}: that run was on stack {identity.get('stack')!r}: pass --stack {identity.get('stack')}"
            )
        if identity.get("model_sha256") != _model_digest(stack):
            raise ConfigError(
                f"--resume {run_id}: the stack's model ({stack.model.setting if stack.model else 'the built-in CNN'}) "
                "is not the one that run trained (its file changed): restore it or start a new run"
            )
    # Every attempt marks its number before it touches a host: a killed one counts too.
    taken = [
        int(p.name.removeprefix(".attempt-")) for p in run_dir.glob(".attempt-*") if p.name[9:].isdigit()
    ]
    attempt = max([1, *taken]) + 1
    return Resumption(run_id, run_dir, attempt=attempt, rounds=rounds or planned, previous=previous)


def mark(r: Resumption) -> None:
    (r.run_dir / f".attempt-{r.attempt}").touch()


def write_identity(run_dir: Path, stack: StackConfig) -> None:
    """What a new run is (the stack, the model file's digest), for a later --resume to check."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"run_id": run_dir.name, "stack": stack.name, "model_sha256": _model_digest(stack)}
    (run_dir / IDENTITY).write_text(json.dumps(data, indent=2) + "\n")


def _model_digest(stack: StackConfig) -> str | None:
    if stack.model is None:
        return None
    try:
        return hashlib.sha256(stack.model.file.read_bytes()).hexdigest()
    except OSError:
        return None


def mirror(aggregator: Host, server_out: str, checkpoint: str, run_dir: Path) -> None:
    """A round's commit (its .npz, then its manifest) copied from the aggregator into
    runs/<run-id>/checkpoints/, keeping the newest KEEP."""
    from fedfleet.core.util import atomic_write

    directory = run_dir / CHECKPOINTS
    for name in (checkpoint, checkpoint.removesuffix(".npz") + ".json"):
        atomic_write(directory / Path(name).name, read_whole(aggregator, f"{server_out}/{name}"))
    newest = _round_of(directory / Path(checkpoint).name)
    for old in directory.glob("round-*.json"):
        if _round_of(old) <= newest - KEEP:
            old.unlink(missing_ok=True)
            old.with_suffix(".npz").unlink(missing_ok=True)


def latest(r: Resumption) -> None:
    """The newest checkpoint in runs/<run-id>/checkpoints/ whose manifest vouches for it."""
    directory = r.run_dir / CHECKPOINTS
    manifests = sorted(directory.glob("round-*.json"), key=_round_of, reverse=True)
    orphans = [p for p in directory.glob("round-*.npz") if not p.with_suffix(".json").exists()]
    r.skipped = [f"{p.name} has no manifest (its commit was cut short)" for p in orphans]
    for manifest_path in manifests:
        npz = manifest_path.with_suffix(".npz")
        manifest = _read_json(manifest_path)
        problem = None
        if manifest is None or "sha256" not in manifest:
            problem = f"{manifest_path} is not a checkpoint manifest"
        elif not npz.exists():
            problem = f"{npz} is missing"
        elif hashlib.sha256(npz.read_bytes()).hexdigest() != manifest["sha256"]:
            problem = f"{npz} is corrupted (its SHA-256 does not match {manifest_path.name})"
        if problem is not None or manifest is None:
            raise CheckpointProblem(
                f"--resume {r.run_id}: {problem}. Delete {npz.name} and {manifest_path.name} from {directory} to "
                "resume from the round before, or start a new run"
            )
        r.done, r.checkpoint = int(manifest["round"]), npz
        return
    why = [*r.skipped, *r.unreachable]
    raise CheckpointProblem(
        f"--resume {r.run_id}: no committed round in {directory}"
        + (f" ({'; '.join(why)})" if why else "")
        + (
            ": the run's output could not be fetched from the aggregator; bring it back, or start a new run"
            if r.unreachable
            else ": the run stopped before its first round was saved; start a new run"
        )
    )


def events_file(attempt: int) -> str:
    """Where an attempt's events are kept in runs/<run-id>/."""
    return EVENTS if attempt == 1 else f"events-attempt-{attempt}.jsonl"


def seed(r: Resumption, state: RunState) -> None:
    """The run so far, as the earlier attempts' events tell it: each attempt's up to the round
    the next one resumed after (what it did later was not committed, or done again), none past
    the commit this attempt resumes from."""
    per_attempt = {a: _events(r.run_dir / events_file(a)) for a in range(1, r.attempt)}
    resumed = {
        a: next((int(e["round"]) for e in events if e.get("event") == "resumed"), None)
        for a, events in per_attempt.items()
    }
    for a, events in per_attempt.items():
        cut = min([r.done, *(k for later, k in resumed.items() if later > a and k is not None)])
        for event in events:
            number = event.get("round")
            if event.get("event") in ("finished", "failed", "resumed") or (
                isinstance(number, int) and number > cut
            ):
                continue
            state.apply(event)
            r.seeded.append(event)
    for number in [n for n in state.rounds if n > r.done]:
        del state.rounds[number]
    state.errors = [e for e in state.errors if not isinstance(e.get("round"), int) or e["round"] <= r.done]
    record = state.rounds.get(r.done)
    if record is not None and record.ended is None and r.checkpoint is not None:
        # Committed, but the aggregator died before it said so: the commit is the word.
        record.ended, record.model, record.trained = (
            r.checkpoint.stat().st_mtime,
            f"models/round-{r.done}.pt",
            True,
        )
    state.status, state.error = "running", None


def _events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short when the aggregator died
        if isinstance(event, dict):
            out.append(event)
    return out


def drop_uncommitted(r: Resumption) -> list[str]:
    """Models an earlier attempt saved for rounds after the commit this one resumes from (the
    aggregator died before committing them): this attempt trains those rounds again."""
    dropped = []
    for model in (r.run_dir / "models").glob("round-*.pt"):
        if _round_of(model) > r.done:
            model.unlink()
            dropped.append(model.name)
    return sorted(dropped)


def last_attempt(summary: Mapping[str, Any] | None) -> int:
    """Which attempt wrote a summary.json."""
    entries = (summary or {}).get("attempts") or []
    return int(entries[-1]["attempt"]) if entries else 1


def attempts(r: Resumption, served: Mapping[str, str], status: str) -> list[dict[str, Any]]:
    """summary.json's `attempts`: every attempt of the run (one killed before writing its
    summary included), this one last."""
    out = []
    for a in range(1, r.attempt):
        s = _read_json(r.run_dir / f"summary-attempt-{a}.json")
        mine = (s or {}).get("attempts") or []
        out.append(
            {
                "attempt": a,
                "started_at": (s or {}).get("started_at") if not mine else mine[-1].get("started_at"),
                "status": (s or {}).get("status", "stopped without writing a summary"),
                "error": (s or {}).get("error"),
                "resumed_after_round": mine[-1].get("resumed_after_round") if mine else None,
            }
        )
    out.append(
        {
            "attempt": r.attempt,
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "status": status,
            "resumed_after_round": r.done,
            "served": dict(served),
            "skipped_checkpoints": r.skipped or None,
        }
    )
    return out


def _round_of(path: Path) -> int:
    try:
        return int(path.stem.removeprefix("round-"))
    except ValueError:
        return -1


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
