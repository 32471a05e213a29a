"""The model and its training maths (fl/fedfleet_app/task.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedfleet_app.task import (
    _sgd_step,
    build_model,
    classification_metrics,
    evaluate,
    load_vector,
    to_vector,
    train,
)
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn(seed: int):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 7, 200))  # labels 5, 6 never true
    ours = classification_metrics(y_true, y_pred, num_classes=7)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        assert ours[name] == pytest.approx(fn(y_true, y_pred, average="macro", zero_division=0)), name


def test_sgd_step_matches_torch_optim():
    torch.manual_seed(0)
    ours, ref = build_model(1, 3, seed=1), build_model(1, 3, seed=1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    buffers = [torch.zeros_like(p) for p in ours.parameters()]
    for _ in range(3):
        for net in (ours, ref):
            net.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
        _sgd_step(list(ours.parameters()), buffers, 0.1)
        optimizer.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 64), (1, 128)])
def test_model_accepts_any_image_size(channels: int, size: int):
    net = build_model(channels, 4)
    assert net(torch.zeros(2, channels, size, size)).shape == (2, 4)


def test_training_learns_a_separable_task():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 256)
    x = rng.normal(0, 0.1, (256, 1, 8, 8)).astype(np.float32)
    x[y == 1, :, :4, :] += 1.0  # class 1: bright top half
    net = build_model(1, 2)
    before = evaluate(net, x, y, 2)
    result = train(net, x, y, epochs=3, batch_size=32, learning_rate=0.05)
    after = evaluate(net, x, y, 2)
    assert result.num_examples == 256
    assert after["accuracy"] > 0.95 > before["accuracy"]


def test_proximal_term_keeps_weights_near_the_global_model():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    start = build_model(1, 3, seed=2)
    drift = {}
    for mu in (0.0, 10.0):
        net = build_model(1, 3, seed=2)
        train(net, x, y, epochs=3, batch_size=16, learning_rate=0.05, proximal_mu=mu)
        drift[mu] = sum(
            float((p - q).detach().pow(2).sum())
            for p, q in zip(net.parameters(), start.parameters(), strict=True)
        )
    assert drift[10.0] < drift[0.0]


def test_weight_vector_round_trips_and_checks_its_size():
    net = build_model(3, 4, seed=5)
    vector = to_vector(net)
    assert vector.dtype == np.float32 and vector.ndim == 1
    assert vector.size == sum(p.numel() for p in net.parameters())
    other = load_vector(build_model(3, 4, seed=6), vector)
    for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="must agree on channels, classes and image size"):
        load_vector(build_model(1, 4), vector)
