"""Ctrl-C and SIGTERM while a playbook runs: a play cancels, but the stop play (run while
a command unwinds) lets one pass and only a second cuts it short."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfleet.adapters import ansible

SLOW = """---
- name: Slow
  hosts: all
  gather_facts: false
  tasks:
    - name: Mark the start
      ansible.builtin.file:
        path: "{{ mark }}"
        state: touch
        mode: "0600"
    - name: Wait
      ansible.builtin.wait_for:
        timeout: 4
    - name: Mark the end
      ansible.builtin.file:
        path: "{{ mark }}.done"
        state: touch
        mode: "0600"
"""


@pytest.fixture
def playbook() -> Iterator[str]:
    path = ansible.PLAYBOOKS / f"_test_slow_{os.getpid()}_{time.monotonic_ns()}.yml"
    path.write_text(SLOW)
    try:
        yield path.name
    finally:
        path.unlink()


def inventory(mark: Path) -> dict[str, object]:
    here = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable, "mark": str(mark)}
    return {"all": {"hosts": {"here": here}}}


def signal_once_started(mark: Path, signals: list[int]) -> threading.Thread:
    def send() -> None:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for sig in signals:
            os.kill(os.getpid(), sig)
            time.sleep(0.3)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.fixture(autouse=True)
def interruptible() -> Iterator[None]:
    """Ctrl-C handled as fedfleet's main() sets it, whatever this process inherited (a job
    started in the background has SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_cancels_a_play(playbook: str, tmp_path: Path):
    mark = tmp_path / "mark"
    sender = signal_once_started(mark, [signal.SIGTERM])
    with pytest.raises(KeyboardInterrupt):
        ansible.apply(playbook, inventory(mark))
    sender.join(10)
    assert not Path(f"{mark}.done").exists()


def test_the_stop_play_finishes_through_one_signal_and_is_cut_short_by_a_second(
    playbook: str, tmp_path: Path
):
    mark = tmp_path / "one"
    sender = signal_once_started(mark, [signal.SIGINT])
    result = ansible.apply(playbook, inventory(mark), cancellable=False)
    sender.join(10)
    assert Path(f"{mark}.done").exists() and result.problems == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    mark = tmp_path / "two"
    sender = signal_once_started(mark, [signal.SIGINT, signal.SIGTERM])
    with pytest.raises(KeyboardInterrupt):
        ansible.apply(playbook, inventory(mark), cancellable=False)
    sender.join(10)
    assert not Path(f"{mark}.done").exists()
