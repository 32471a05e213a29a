"""pip at the edge: the wheel cache hosts install from when they cannot reach an index.

The controller downloads the pinned packages (and what they need, within the project's
lock file) once; hosts get the wheels over SSH and install with `--no-index`.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fedfleet.core.errors import EnvironmentProblem
from fedfleet.core.util import atomic_write

# The project's pins: what every environment fedfleet makes is constrained to.
LOCK = Path(__file__).resolve().parents[2] / "requirements.lock"
READY = ".complete"  # written last: a cache without it is half-made and is made again


def python_tag() -> str:
    """The interpreter and machine the wheels are for (hosts must match it)."""
    return f"cp{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}"


def build_cache(dest: Path, requirements: Sequence[str], constraints: Path | None) -> Path:
    """Download `requirements` as wheels into `dest` (once: a complete cache is reused)."""
    if (dest / READY).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".wheels-", dir=dest.parent))
    argv = [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
        "--dest", str(work), *(["--constraint", str(constraints)] if constraints else []), *requirements,
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
        if done.returncode != 0:
            raise EnvironmentProblem(
                "could not build the wheel cache for hosts that install offline (`pip download "
                f"{' '.join(requirements)}`): {done.stderr.strip()[-800:]}. This machine needs a "
                "package index (or pip's find-links) that has them"
            )
        atomic_write(work / READY, "\n".join(requirements) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return dest


def archive(cache: Path) -> Path:
    """The cache as one uncompressed tar beside it (what hosts get: one file, copied once)."""
    tar = cache.with_name(cache.name + ".tar")
    if not tar.exists():
        pack(cache, tar)
    return tar


def pack(directory: Path, tar: Path, arcname: str = ".") -> Path:
    """`directory` as a tar, written atomically (a reader never sees half an archive)."""
    fd, name = tempfile.mkstemp(prefix=f".{tar.name}.", suffix=".tmp", dir=tar.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with tarfile.open(tmp, "w") as out:
            out.add(directory, arcname=arcname, filter=_plain)
        tmp.replace(tar)
    finally:
        tmp.unlink(missing_ok=True)
    return tar


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Files as anyone may own them: no controller user or group, no bytecode caches."""
    if "__pycache__" in info.name:
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0  # the same contents make the same archive
    # Readable by all, as the playbooks make the directories they unpack into (the root
    # entry's mode becomes theirs: a private 0700 here would undo their 0755 every time).
    info.mode = 0o755 if info.isdir() else 0o644
    return info


APP_BASE_PTH = "_fedfleet_base.pth"


def app_env(
    dest: Path, requirements: Sequence[str], constraints: Path | None, scripts: dict[str, str]
) -> Path:
    """A Python environment for a Flower app of your own on this machine (the local stack's
    emulated hosts run it): a venv that sees this environment's packages (Flower, torch) through
    a .pth file and gets only what the app adds, installed by pip as wheels within the project's
    pins, so fedfleet's own stays as `make setup` made it. `scripts` (name -> `module:function`)
    become console scripts run by the env's Python. Made once per set of requirements (one
    command at a time: a lock beside it); one that is half-made, or that names another place
    (the project moved), is made again."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (dest.parent / f".{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _usable(dest):
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        _make_app_env(dest, requirements, constraints, scripts)
    return dest


def _usable(env: Path) -> bool:
    """Complete, and made for this environment at this place."""
    if not (env / READY).exists() or not (env / "bin" / "python").exists():
        return False
    pth = list(env.glob(f"lib/python*/site-packages/{APP_BASE_PTH}"))
    return bool(pth) and pth[0].read_text().strip() == sysconfig.get_path("purelib")


def _make_app_env(
    dest: Path, requirements: Sequence[str], constraints: Path | None, scripts: dict[str, str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise EnvironmentProblem(f"could not make the app's environment {dest}: {done.stderr.strip()[-400:]}")
    python = dest / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, APP_BASE_PTH).write_text(sysconfig.get_path("purelib") + "\n")
    if requirements:
        argv = [
            sys.executable, "-m", "pip", "--python", str(python), "install", "--disable-pip-version-check",
            "--no-input", "--only-binary=:all:", *(["--constraint", str(constraints)] if constraints else []),
            *requirements,
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1800)
        if done.returncode != 0:
            pins = f" within {constraints.name}'s pins" if constraints else ""
            raise EnvironmentProblem(
                f"pip could not install {', '.join(requirements)} as wheels{pins}: {_pip_error(done.stderr)}"
            )
    for name, target in scripts.items():
        module, function = target.split(":")
        script = dest / "bin" / name
        script.write_text(
            f"#!{python}\nimport sys\nfrom {module} import {function}\n\nsys.exit({function}())\n"
        )
        script.chmod(0o755)
    atomic_write(dest / READY, "\n".join(requirements) + "\n")


def _pip_error(stderr: str) -> str:
    """pip's own reason (its ERROR lines), else the end of what it said."""
    errors = [line.removeprefix("ERROR: ") for line in stderr.splitlines() if line.startswith("ERROR:")]
    return " ".join(errors)[-800:] if errors else stderr.strip()[-800:]
