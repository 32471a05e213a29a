"""Three small things every layer needs, written once: atomic writes, closest-name
suggestions, and polling with a deadline."""

from __future__ import annotations

import difflib
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never
    a part: write a sibling temporary file (created with `mode`, so a private file is never
    readable by others even for a moment), flush it to disk, rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def closest(name: str, options: Iterable[str], prefix: str = "", n: int = 1) -> str:
    """A hint for a misspelt name: "did you mean 'x'?" (n=1) or "closest: a, b, c" (n>1);
    with nothing close, the known names (n=1) or how many there are (n>1)."""
    known = list(options)
    matches = difflib.get_close_matches(name, known, n=n, cutoff=0.6 if n == 1 else 0.5)
    if n == 1:
        if matches:
            return f"did you mean '{prefix}{matches[0]}'?"
        return f"known: {', '.join(prefix + o for o in known) or 'none'}"
    return f"closest: {', '.join(matches)}" if matches else f"{len(known)} known, none close"


def poll(check: Callable[[], T], timeout: float, every: float = 0.2) -> T:
    """Call `check` until it returns something truthy or `timeout` seconds have passed;
    return its last answer (falsy: the deadline passed). It is always called at least once."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer or time.monotonic() >= deadline:
            return answer
        time.sleep(min(every, max(0.0, deadline - time.monotonic())))
