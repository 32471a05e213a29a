"""Model, training and evaluation: plain PyTorch, no Flower imports.

The CNN adapts to any input size through an adaptive pooling layer, so the same
network serves 8x8 demo digits and 128x128 chest X-rays; only `channels` and
`num_classes` change its shape. A stack may name its own network instead
(`fedfleet:app.model`): a factory taking num_classes, channels and image_size.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class ModelError(ValueError):
    """The model factory cannot be used; the message says why and the fix."""


# Factories by "module:function", and where a process outside the app finds their file
# (the VM's warm worker is not started from the FAB; the ClientApp names the file).
_model_files: dict[str, str] = {}


def use_model_file(ref: str, path: str) -> None:
    _model_files[ref] = path


def model_factory(ref: str) -> Callable[..., nn.Module]:
    """The factory `module:function`: imported (inside the app), or loaded from the file
    `use_model_file` named. A file is loaded again when it changed."""
    module_name, _, function = ref.partition(":")
    path = _model_files.get(ref)
    try:
        if path is None:
            module = importlib.import_module(module_name)
        else:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
            name = f"_fedfleet_model_{digest}"
            module = sys.modules.get(name) or _load(name, path)
    except Exception as err:  # the user's code: any error is theirs to see
        raise ModelError(f"model {ref}: its module does not import ({type(err).__name__}: {err})") from err
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ModelError(
            f"model {ref}: {module_name} has no function {function!r} (it has: "
            f"{', '.join(n for n in dir(module) if not n.startswith('_')) or 'nothing'})"
        )
    return factory  # type: ignore[no-any-return]


def _load(name: str, path: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_model(
    channels: int, num_classes: int, seed: int = 0, *, model: str = "", image_size: int = 8
) -> nn.Module:
    """A freshly initialised model, the same seed giving the same weights: the built-in CNN,
    or what the factory `model` (module:function) returns for these sizes."""
    torch.manual_seed(seed)
    if not model:
        return Net(channels, num_classes)
    sizes = {"num_classes": num_classes, "channels": channels, "image_size": image_size}
    try:
        net = model_factory(model)(**sizes)
    except ModelError:
        raise
    except Exception as err:  # the user's code
        call = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ModelError(
            f"model {model}: calling it as ({call}) failed ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(net, nn.Module):
        raise ModelError(f"model {model} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def check_model(net: nn.Module, model: str, channels: int, num_classes: int, image_size: int) -> None:
    """Raise ModelError unless `net` maps a batch of images to one score per class."""
    with torch.no_grad():
        try:
            out = net(torch.zeros(2, channels, image_size, image_size))
        except Exception as err:
            raise ModelError(
                f"model {model} fails on a batch of {channels}x{image_size}x{image_size} images "
                f"({type(err).__name__}: {err})"
            ) from err
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        raise ModelError(
            f"model {model} gives output of shape {shape} for 2 images, not (2, {num_classes}): one "
            f"score per class ({num_classes} classes); make its last layer output num_classes"
        )


@dataclass(frozen=True)
class TrainResult:
    loss: float
    num_examples: int
    seconds: float


def train(
    net: nn.Module,
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


def evaluate(net: nn.Module, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
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


def to_vector(net: nn.Module) -> np.ndarray:
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


def load_vector(net: nn.Module, vector: np.ndarray) -> nn.Module:
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
