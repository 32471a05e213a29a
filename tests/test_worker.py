"""The VM's warm worker gives the same results as computing in-process (fl/fedfleet_app/worker.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fedfleet_app import worker
from fedfleet_app.data import write_demo
from fedfleet_app.settings import AppSettings
from fedfleet_app.task import build_model, to_vector


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    write_demo([root / "a", root / "b"], iid=True, alpha=1.0, seed=0, test_fraction=0.2)
    return root / "a"


@pytest.fixture(scope="module")
def running_worker(tmp_path_factory):
    home = tmp_path_factory.mktemp("worker")
    sock, key = home / "w.sock", home / "w.key"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedfleet_app.worker", "--socket", str(sock), "--key-file", str(key)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert "ready" in proc.stdout.readline()  # blocks until it listens (or dies: empty line)
    yield sock, key
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    assert not sock.exists()


def request(site: Path) -> dict:
    weights = to_vector(build_model(1, 10))
    return {
        "op": "train",
        "weights": weights,
        "evaluate_received": True,
        "proximal_mu": 0.0,
        "server_round": 1,
        "data_path": str(site),
        "run_config": AppSettings().to_run_config(),
    }


def test_worker_and_in_process_agree(running_worker, site: Path):
    sock, key = running_worker
    remote = worker.call(str(sock), str(key), request(site), timeout=60)
    local = worker.handle(request(site))
    assert remote["metrics"]["num-examples"] == local["metrics"]["num-examples"] > 0
    assert np.allclose(remote["weights"], local["weights"], atol=1e-6)
    assert not np.allclose(local["weights"], request(site)["weights"])  # it did train
    assert remote["evaluation"]["accuracy"] == pytest.approx(local["evaluation"]["accuracy"])


def test_worker_socket_is_private(running_worker):
    sock, _ = running_worker
    assert sock.stat().st_mode & 0o077 == 0


def test_wrong_key_or_no_worker_means_unavailable(running_worker, site: Path, tmp_path: Path):
    sock, _ = running_worker
    wrong = tmp_path / "wrong.key"
    wrong.write_text("00" * 32)
    with pytest.raises(worker.WorkerUnavailable):
        worker.call(str(sock), str(wrong), request(site), timeout=10)
    with pytest.raises(worker.WorkerUnavailable, match="no worker socket"):
        worker.call(str(tmp_path / "none.sock"), str(wrong), request(site), timeout=10)


def test_stale_worker_code_is_refused(running_worker, site: Path, monkeypatch):
    sock, key = running_worker
    monkeypatch.setattr(worker, "code_version", lambda: "0" * 64)  # the ClientApp's FAB differs
    with pytest.raises(worker.WorkerUnavailable, match="not this app's"):
        worker.call(str(sock), str(key), request(site), timeout=10)


def test_errors_on_the_worker_reach_the_caller(running_worker, tmp_path: Path):
    sock, key = running_worker
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DataError: .* does not exist"):
        worker.call(str(sock), str(key), request(tmp_path / "missing"), timeout=30)
    assert time.monotonic() - started < 30
