"""Model, training and evaluation: plain PyTorch, no Flower imports.

The CNN adapts to any input size through an adaptive pooling layer, so the same
network serves 8x8 demo digits and 128x128 chest X-rays; only `channels` and
`num_classes` change its shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# Each ClientApp process trains on one core: several SuperNodes share a host in
# the local stack, and intra-op threads only fight each other there.
torch.set_num_threads(1)


class Net(nn.Module):
    """Two convolution blocks and a two-layer classifier head (~40k parameters)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(channels: int, num_classes: int, seed: int = 0) -> Net:
    """Return a freshly initialised model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return Net(channels, num_classes)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    seconds: float


def train(
    net: Net,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float = 0.0,
    seed: int = 0,
) -> TrainResult:
    """Train `net` in place with SGD; add FedProx's proximal term when mu > 0."""
    started = time.perf_counter()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    params = list(net.parameters())
    global_params = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    momentum = [torch.zeros_like(p) for p in params]
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    net.train()
    total_loss, seen = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            net.zero_grad(set_to_none=False)
            loss = criterion(net(xt[idx]), yt[idx])
            if proximal_mu > 0:
                prox = sum((p - g).pow(2).sum() for p, g in zip(params, global_params, strict=True))
                loss = loss + (proximal_mu / 2) * prox
            loss.backward()
            _sgd_step(params, momentum, learning_rate)
            total_loss += float(loss.item()) * len(idx)
            seen += len(idx)
    return TrainResult(
        loss=total_loss / max(seen, 1),
        num_examples=len(xt),
        seconds=time.perf_counter() - started,
    )


def _sgd_step(params: list[nn.Parameter], momentum: list[torch.Tensor], lr: float) -> None:
    """SGD with momentum 0.9, as torch.optim.SGD(lr=lr, momentum=0.9) computes it.

    Written out because constructing any torch.optim optimizer imports
    torch._dynamo (2.1 s measured here), and every Flower message starts a fresh
    ClientApp process: that import alone cost more than the training.
    tests/test_task.py checks the update against torch.optim.SGD.
    """
    with torch.no_grad():
        for p, buf in zip(params, momentum, strict=True):
            if p.grad is None:
                continue
            buf.mul_(0.9).add_(p.grad)
            p.add_(buf, alpha=-lr)


def evaluate(net: Net, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    """Loss, accuracy and macro precision/recall/F1 of `net` on (x, y)."""
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(x))
        loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)).item())
        predicted = logits.argmax(dim=1).numpy()
    return {"loss": loss, **classification_metrics(y, predicted, num_classes)}


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1.

    Computed from the confusion matrix with numpy rather than scikit-learn: every
    Flower message starts a fresh ClientApp process and importing sklearn costs
    ~2.5 s there. Classes absent from both truth and prediction are left out of
    the macro average (as scikit-learn does with `labels` unset); a class that is
    predicted but never true, or true but never predicted, counts as 0.
    tests/test_task.py checks the numbers against scikit-learn.
    """
    confusion = np.bincount(
        y_true.astype(np.int64) * num_classes + y_pred.astype(np.int64),
        minlength=num_classes * num_classes,
    ).reshape(num_classes, num_classes)
    true_pos = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    present = (predicted + actual) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_pos / predicted, 0.0)
        recall = np.where(actual > 0, true_pos / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = confusion.sum()
    return {
        "accuracy": float(true_pos.sum() / total) if total else 0.0,
        "precision": float(precision[present].mean()) if present.any() else 0.0,
        "recall": float(recall[present].mean()) if present.any() else 0.0,
        "f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def to_vector(net: Net) -> np.ndarray:
    """Every tensor of the model in one float32 vector, in state_dict order.

    This is how weights travel in Flower messages. Flower moves each Array of an
    ArrayRecord as an object of its own through three HTTP hops (ClientApp ->
    SuperNode -> SuperLink -> ServerApp); one vector instead of one Array per tensor
    took the reply path from ~5 s to ~2 s per round here (bench/bench_run.py).
    Aggregation is unchanged: Flower's strategies work element-wise (Krum on the
    whole flattened update), so FedAvg of the vector is FedAvg of the tensors.
    """
    return np.concatenate([t.detach().cpu().numpy().ravel() for t in net.state_dict().values()]).astype(
        np.float32, copy=False
    )


def load_vector(net: Net, vector: np.ndarray) -> Net:
    """Put `vector` (from `to_vector` of the same architecture) back into `net`."""
    state = net.state_dict()
    expected = sum(t.numel() for t in state.values())
    if vector.ndim != 1 or vector.size != expected:
        raise ValueError(
            f"weights vector has shape {vector.shape} but this model has {expected} values; "
            "the participants and the server must agree on channels, classes and image size"
        )
    loaded, at = {}, 0
    for name, tensor in state.items():
        loaded[name] = torch.from_numpy(vector[at : at + tensor.numel()].reshape(tensor.shape).copy())
        at += tensor.numel()
    net.load_state_dict(loaded)
    return net
