"""Architectures of the paper (Caffe definitions) as nn.Sequential with real nn.Dropout modules,
and checkpoints that load with weights_only=True.

Every model is a flat nn.Sequential so MC code can split it at its first dropout layer.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dd_dist.errors import UserError
from dd_dist.files import atomic_write


def _w(units: int, width: float) -> int:
    return max(1, round(units * width))


def mlp(c, h, w, classes, p, width):
    """Wang & Manning's 784-800-800-10 with dropout after each hidden layer."""
    n = _w(800, width)
    return [nn.Flatten(), nn.Linear(c * h * w, n), nn.ReLU(), nn.Dropout(p),
            nn.Linear(n, n), nn.ReLU(), nn.Dropout(p), nn.Linear(n, classes)]


def _lenet(c, h, w, classes, p, width, every_layer: bool):
    c1, c2, f = _w(20, width), _w(50, width), _w(500, width)
    flat = c2 * (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2)  # two valid 5x5 convs, two 2x2 pools
    drop = (lambda: [nn.Dropout(p)]) if every_layer else (lambda: [])
    return [nn.Conv2d(c, c1, 5), nn.MaxPool2d(2), *drop(), nn.Conv2d(c1, c2, 5), nn.MaxPool2d(2), *drop(),
            nn.Flatten(), nn.Linear(flat, f), nn.ReLU(), nn.Dropout(p), nn.Linear(f, classes)]


def lenet(c, h, w, classes, p, width):
    """Caffe LeNet; dropout only before the last layer."""
    return _lenet(c, h, w, classes, p, width, every_layer=False)


def lenet_all(c, h, w, classes, p, width):
    """LeNet with dropout after every layer (the paper's LeNetAll)."""
    return _lenet(c, h, w, classes, p, width, every_layer=True)


def cifar_quick(c, h, w, classes, p, width):
    """Caffe cifar10_quick, with dropout after each conv block and before the classifier."""
    a, b, f = _w(32, width), _w(64, width), _w(64, width)
    side = h
    for _ in range(3):
        side = -(-(side - 3) // 2) + 1  # ceil-mode 3/2 pooling, as Caffe does
    return [nn.Conv2d(c, a, 5, padding=2), nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(), nn.Dropout(p),
            nn.Conv2d(a, a, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(p),
            nn.Conv2d(a, b, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(p),
            nn.Flatten(), nn.Linear(b * side * side, f), nn.Dropout(p), nn.Linear(f, classes)]


def _conv_relu(cin, cout, k, stride=1):
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2), nn.ReLU()]


def nin(c, h, w, classes, p, width):
    """Network in Network for CIFAR: three mlpconv blocks, dropout after the first two, global pooling."""
    a, b, d = _w(192, width), _w(160, width), _w(96, width)
    return [*_conv_relu(c, a, 5), *_conv_relu(a, b, 1), *_conv_relu(b, d, 1),
            nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(p),
            *_conv_relu(d, a, 5), *_conv_relu(a, a, 1), *_conv_relu(a, a, 1),
            nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(p),
            *_conv_relu(a, a, 3), *_conv_relu(a, a, 1), nn.Conv2d(a, classes, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten()]


def allconv(c, h, w, classes, p, width):
    """All-CNN-C: input dropout 0.2, strided convolutions instead of pooling, global pooling."""
    a, b = _w(96, width), _w(192, width)
    return [nn.Dropout(0.2), *_conv_relu(c, a, 3), *_conv_relu(a, a, 3), *_conv_relu(a, a, 3, 2), nn.Dropout(p),
            *_conv_relu(a, b, 3), *_conv_relu(b, b, 3), *_conv_relu(b, b, 3, 2), nn.Dropout(p),
            nn.Conv2d(b, b, 3), nn.ReLU(), *_conv_relu(b, b, 1), nn.Conv2d(b, classes, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten()]


ARCHS: dict[str, Callable] = {f.__name__: f for f in (mlp, lenet, lenet_all, cifar_quick, nin, allconv)}


def model_spec(arch: str, in_shape, num_classes: int, p: float, width: float = 1.0) -> dict:
    return {"arch": arch, "in_shape": list(in_shape), "num_classes": int(num_classes), "p": float(p), "width": float(width)}


def build_model(arch: str, in_shape, num_classes: int, p: float = 0.5, width: float = 1.0) -> nn.Sequential:
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r} (allowed: {', '.join(ARCHS)})")
    if width <= 0:
        raise UserError(f"model width must be > 0 (got {width})")
    model = nn.Sequential(*ARCHS[arch](*in_shape, num_classes, p, width))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *in_shape))
    except RuntimeError:
        raise UserError(f"architecture {arch} cannot take inputs of shape {tuple(in_shape)}") from None
    return model


def save_model(path, model: nn.Module, spec: dict, extra: dict | None = None) -> None:
    """A plain dict of tensors and primitives, written atomically; loads with weights_only=True."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save({"spec": spec, "state_dict": state, **(extra or {})}, tmp))


def read_checkpoint(path) -> dict:
    """The raw checkpoint dict, refusing anything that is not plain tensors and primitives."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found or not a file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"checkpoint {path} refused: it is not plain weights ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # zip/EOF errors of a truncated or foreign file
        raise UserError(f"checkpoint {path} is unreadable: {type(e).__name__}") from None
    if not isinstance(ckpt, dict) or "spec" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"checkpoint {path} is not a dd-dist model (no spec/state_dict)")
    return ckpt


def load_model(path) -> tuple[nn.Sequential, dict]:
    ckpt = read_checkpoint(path)
    spec = ckpt["spec"]
    model = build_model(**spec)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise UserError(f"checkpoint {path} does not match its architecture {spec.get('arch')}") from None
    return model.eval(), spec


def init_student_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Ω ← Θ*: copy every tensor whose shape matches; resized layers get N(0, 0.01²) weights, zero biases."""
    source, reset = teacher.state_dict(), []
    with torch.no_grad():
        for name, param in student.state_dict().items():
            if name in source and source[name].shape == param.shape:
                param.copy_(source[name])
            else:
                param.normal_(0, 0.01) if name.endswith("weight") else param.zero_()
                reset.append(name)
    return reset
