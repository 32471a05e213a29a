"""A site's train and evaluate steps on a plain numpy weight vector (no Flower here).

Called in-process by the ClientApp, or by the VM's warm worker (worker.py),
which keeps torch imported and the site's data loaded between Flower messages.
Both paths run exactly this code.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .data import DataSpec, Split, load_site
from .settings import AppSettings
from .task import build_model, evaluate, load_vector, to_vector, train

_sites: dict[tuple[str, DataSpec], tuple[tuple[Any, ...], tuple[Split, Split]]] = {}


def _fingerprint(root: Path) -> tuple[Any, ...]:
    """Names, sizes and mtimes of every file under `root`: any change reloads the data."""
    entries = []
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            entries.append((folder, name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def site_data(data_path: str, spec: DataSpec) -> tuple[Split, Split]:
    """The site's (train, test) splits, cached while its files are unchanged."""
    key = (data_path, spec)
    stamp = _fingerprint(Path(data_path)) if Path(data_path).is_dir() else ()
    cached = _sites.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    splits = load_site(data_path, spec)
    _sites[key] = (stamp, splits)
    return splits


def _model(settings: AppSettings, weights: np.ndarray) -> nn.Module:
    net = build_model(
        settings.channels, settings.num_classes, model=settings.model, image_size=settings.image_size
    )
    return load_vector(net, np.asarray(weights))


def run_train(
    data_path: str,
    settings: AppSettings,
    weights: np.ndarray,
    *,
    evaluate_received: bool,
    proximal_mu: float,
    server_round: int,
) -> dict[str, Any]:
    """Optionally evaluate the received model, then train it; return weights and metrics."""
    trainset, testset = site_data(data_path, settings.data_spec)
    net = _model(settings, weights)
    out: dict[str, Any] = {}
    if evaluate_received:
        started = time.perf_counter()
        scores = evaluate(net, testset.x, testset.y, settings.num_classes)
        out["evaluation"] = {
            **scores,
            "num-examples": len(testset),
            "eval-seconds": time.perf_counter() - started,
        }
    result = train(
        net,
        trainset.x,
        trainset.y,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        proximal_mu=proximal_mu,
        seed=settings.model_seed + server_round,
    )
    out["weights"] = to_vector(net)
    out["metrics"] = {
        "train-loss": result.loss,
        "train-seconds": result.seconds,
        "num-examples": result.num_examples,
    }
    return out


def run_evaluate(data_path: str, settings: AppSettings, weights: np.ndarray) -> dict[str, Any]:
    _, testset = site_data(data_path, settings.data_spec)
    net = _model(settings, weights)
    started = time.perf_counter()
    scores = evaluate(net, testset.x, testset.y, settings.num_classes)
    return {
        "metrics": {
            **scores,
            "num-examples": len(testset),
            "eval-seconds": time.perf_counter() - started,
        }
    }
