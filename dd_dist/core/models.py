"""Architectures of the paper (Caffe definitions) as nn.Sequential with real nn.Dropout modules,
and checkpoints that load with weights_only=True.

Every built-in model is a flat nn.Sequential, so MC code can split it at its first dropout layer and
share the prefix. `package.module:factory` builds a net of the user's own (any nn.Module whose dropouts
are nn.Dropout / nn.Dropout2d modules), checked by check_for_mc.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import io
import math
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dd_dist.core.heads import UncertaintyStudent
from dd_dist.core.mc import dropout_layers, mc_probs
from dd_dist.errors import UserError
from dd_dist.files import atomic_write, file_sha256  # noqa: F401  (file_sha256: part of this module's API)


def _w(units: int, width: float) -> int:
    return max(1, round(units * width))


def _units_out(layers: list[nn.Module], in_shape) -> int:
    """Units a stack of layers outputs for one input: a dry run, so the classifier always fits it.
    (No .eval() here: it would leave the new model's modules in eval mode while the model says train.)"""
    with torch.no_grad():
        return nn.Sequential(*layers)(torch.zeros(1, *in_shape)).numel()


def mlp(in_shape, classes, p, width):
    """Wang & Manning's 784-800-800-10 with dropout after each hidden layer."""
    n = _w(800, width)
    return [nn.Flatten(), nn.Linear(math.prod(in_shape), n), nn.ReLU(), nn.Dropout(p),
            nn.Linear(n, n), nn.ReLU(), nn.Dropout(p), nn.Linear(n, classes)]


def _lenet(in_shape, classes, p, width, conv_dropout: str | None):
    """Caffe LeNet (conv -> max-pool, twice); conv_dropout: None, or where each conv block's dropout sits,
    "after" its max-pool or "before" it."""
    c1, c2, f = _w(20, width), _w(50, width), _w(500, width)
    features = []
    for conv in (nn.Conv2d(in_shape[0], c1, 5), nn.Conv2d(c1, c2, 5)):
        block = [conv, nn.MaxPool2d(2)]
        if conv_dropout:
            block.insert({"before": 1, "after": 2}[conv_dropout], nn.Dropout(p))
        features += block
    features.append(nn.Flatten())
    return [*features, nn.Linear(_units_out(features, in_shape), f), nn.ReLU(), nn.Dropout(p), nn.Linear(f, classes)]


def lenet(in_shape, classes, p, width):
    """Caffe LeNet; dropout only before the last layer."""
    return _lenet(in_shape, classes, p, width, conv_dropout=None)


def lenet_all(in_shape, classes, p, width):
    """LeNet with dropout after every block: each conv block's after its max-pool."""
    return _lenet(in_shape, classes, p, width, conv_dropout="after")


def lenet_all_prepool(in_shape, classes, p, width):
    """LeNet with dropout on each conv's output before its max-pool: Gal & Ghahramani's Caffe "lenet-all"
    (yaringal/DropoutUncertaintyCaffeModels, mnist_uncertainty/lenet_all_dropout_train_test.prototxt), one
    reading of the paper's LeNetAll, which does not show its layout. Weight scaling is a poorer stand-in for the
    mask average here (a max-pool of dropped-out inputs is not the max-pool of their means): MC gains more."""
    return _lenet(in_shape, classes, p, width, conv_dropout="before")


def cifar_quick(in_shape, classes, p, width):
    """Caffe cifar10_quick (ceil-mode pools as in Caffe; no ReLU between ip1 and ip2, as there).

    Caffe's file has no dropout; we add it after each of the three conv blocks as well as before the
    classifier, so that there is an ensemble worth distilling, as in the paper's Quick-with-dropout net.
    """
    a, b, f = _w(32, width), _w(64, width), _w(64, width)
    features = [nn.Conv2d(in_shape[0], a, 5, padding=2), nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU(), nn.Dropout(p),
                nn.Conv2d(a, a, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(p),
                nn.Conv2d(a, b, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(p),
                nn.Flatten()]
    return [*features, nn.Linear(_units_out(features, in_shape), f), nn.Dropout(p), nn.Linear(f, classes)]


def _conv_relu(cin, cout, k, stride=1, padding=None):
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding), nn.ReLU()]


def nin(in_shape, classes, p, width):
    """Network in Network for CIFAR: three mlpconv blocks, dropout after the first two, global average pool.

    The last 1x1 conv keeps its ReLU, as in the Caffe model: the pooled class maps are the logits.
    """
    a, b, d = _w(192, width), _w(160, width), _w(96, width)
    return [*_conv_relu(in_shape[0], a, 5), *_conv_relu(a, b, 1), *_conv_relu(b, d, 1),
            nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(p),
            *_conv_relu(d, a, 5), *_conv_relu(a, a, 1), *_conv_relu(a, a, 1),
            nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(p),
            *_conv_relu(a, a, 3), *_conv_relu(a, a, 1), *_conv_relu(a, classes, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten()]


def allconv(in_shape, classes, p, width):
    """All-CNN-C: dropout 0.2 on the input, strided convolutions instead of pooling, global average pool.

    As in Springenberg et al.'s table, the 3x3 conv after the second block is unpadded and every conv,
    the last 1x1 included, has a ReLU.
    """
    a, b = _w(96, width), _w(192, width)
    return [nn.Dropout(0.2), *_conv_relu(in_shape[0], a, 3), *_conv_relu(a, a, 3), *_conv_relu(a, a, 3, 2),
            nn.Dropout(p),
            *_conv_relu(a, b, 3), *_conv_relu(b, b, 3), *_conv_relu(b, b, 3, 2), nn.Dropout(p),
            *_conv_relu(b, b, 3, padding=0), *_conv_relu(b, b, 1), *_conv_relu(b, classes, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten()]


ARCHS: dict[str, Callable] = {f.__name__: f for f in (mlp, lenet, lenet_all, lenet_all_prepool, cifar_quick, nin,
                                                       allconv)}


def is_factory(arch: str) -> bool:
    """`package.module:factory`: a net of the user's own, rather than a built-in name."""
    return ":" in arch


def model_spec(arch: str, in_shape, num_classes: int, p: float, width: float = 1.0, kwargs: dict | None = None,
               uncertainty_head: dict | None = None) -> dict:
    """The plain-data description stored in checkpoints: build_model(**spec) rebuilds the net. A factory's
    spec also holds its kwargs, a student with an uncertainty head the head's settings (plain data, so the
    checkpoint still loads with weights_only=True)."""
    spec = {"arch": arch, "in_shape": [int(s) for s in in_shape], "num_classes": int(num_classes),
            "p": float(p), "width": float(width)}
    if is_factory(arch):
        spec["kwargs"] = dict(kwargs or {})
    return {**spec, "uncertainty_head": dict(uncertainty_head)} if uncertainty_head else spec


def build_model(arch: str, in_shape, num_classes: int, p: float = 0.5, width: float = 1.0,
                kwargs: dict | None = None, uncertainty_head: dict | None = None) -> nn.Module:
    """The net of a spec; with uncertainty_head ({"hidden": units, "form": heads.FORM}) wrapped in an UncertaintyStudent."""
    net = _build_net(arch, in_shape, num_classes, p, width, kwargs)
    if not uncertainty_head:
        return net
    try:
        return UncertaintyStudent(net, **uncertainty_head)
    except ValueError as e:
        raise UserError(f"model {arch}: {e}") from None


def _build_net(arch: str, in_shape, num_classes: int, p: float, width: float, kwargs: dict | None) -> nn.Module:
    if is_factory(arch):
        return from_factory(arch, in_shape, num_classes, p, width, kwargs or {})
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r} (allowed: {', '.join(ARCHS)}, or package.module:factory)")
    if not width > 0:
        raise UserError(f"model width must be > 0 (got {width})")
    if not 0 <= p < 1:
        raise UserError(f"dropout p must be in [0, 1) (got {p})")
    if len(in_shape) != 3 or min(in_shape) < 1 or num_classes < 1:
        raise UserError(f"input shape must be (channels, height, width) and classes >= 1 "
                        f"(got {tuple(in_shape)}, {num_classes})")
    try:  # too small an input fails in a dry run, inside the builder or after it
        model = nn.Sequential(*ARCHS[arch](tuple(in_shape), num_classes, p, width))
        _units_out(list(model), in_shape)
    except RuntimeError:
        raise UserError(f"architecture {arch} cannot take inputs of shape {tuple(in_shape)}") from None
    return model


def import_factory(arch: str) -> Callable:
    module_name, _, name = arch.partition(":")
    # As under `python -m`: a module in the working directory imports (the dd-dist script's own folder is
    # the venv's bin); a local Ray's workers get it on PYTHONPATH (infra.cluster.ray_session).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any error in it is theirs to fix
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise UserError(f"model {arch}: cannot import {module_name} ({type(e).__name__}: {reason})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"model {arch}: {module_name} has no function or class {name}")
    return factory


def from_factory(arch: str, in_shape, num_classes: int, p: float, width: float, kwargs: dict) -> nn.Module:
    """The user's net: factory(**kwargs) plus whichever of in_shape, num_classes, p and width its signature
    names; refused in one line where it fails to build, or takes or gives tensors of the wrong shape."""
    factory = import_factory(arch)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: only the kwargs
        params = {}
    any_keyword = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values())
    given = {"in_shape": tuple(in_shape), "num_classes": num_classes, "p": p, "width": width}
    args = {k: v for k, v in given.items() if k in params or any_keyword}
    if set(kwargs) & set(given):
        raise UserError(f"kwargs cannot set {', '.join(sorted(set(kwargs) & set(given)))}: dd-dist passes them "
                        f"(from the data, model.p and distill.width)")
    if width != 1 and "width" not in args:
        raise UserError(f"a student of width {width} needs a factory that takes `width`; {arch} does not")
    try:
        model = factory(**args, **kwargs)
    except TypeError as e:
        called = ", ".join(sorted({**args, **kwargs}))
        raise UserError(f"model {arch}: calling it with {called} failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model {arch} returned a {type(model).__name__}, not an nn.Module")
    try:
        with torch.no_grad():
            out = model.eval()(_probe_input(in_shape))
    except RuntimeError as e:
        raise UserError(f"model {arch} cannot take inputs of shape {tuple(in_shape)} "
                        f"({str(e).strip().splitlines()[0][:120]})") from None
    if tuple(out.shape) != (2, num_classes):
        raise UserError(f"model {arch} gives outputs of shape {tuple(out.shape)} for 2 images, "
                        f"not (2, {num_classes}): one logit per class")
    return model


def _probe_input(in_shape) -> torch.Tensor:
    return torch.rand(2, *in_shape, generator=torch.Generator().manual_seed(0))


def check_for_mc(model: nn.Module, spec: dict) -> None:
    """Refuse, in one line, a teacher of the user's (spec of a factory) on which MC dropout would be wrong: no
    dropout module, a dropout MC cannot seed or one that runs twice in a forward pass, or other randomness
    in the forward pass (F.dropout). The built-in nets are right by construction."""
    arch = spec["arch"]
    if not is_factory(arch):
        return
    if not dropout_layers(model):
        raise UserError(f"model {arch}: {type(model).__name__} has no nn.Dropout or nn.Dropout2d module, "
                        f"so MC dropout has nothing to average")
    x = _probe_input(spec["in_shape"])
    try:
        mc_probs(model, x, [0, 1], 1, 0)
    except ValueError as e:  # MC's own structural refusals
        raise UserError(f"model {arch}: {e}") from None
    culprit = _random_outside_dropout(model, x)
    if culprit:
        raise UserError(f"model {arch}: {culprit} is random in its forward pass outside its nn.Dropout modules "
                        f"(F.dropout?): MC dropout can only seed nn.Dropout / nn.Dropout2d modules")


def _random_outside_dropout(model: nn.Module, x: torch.Tensor) -> str | None:
    """The first module, in call order, whose output differs between two train-mode passes over the same
    input with every dropout module off and different torch seeds; None when there is none. Runs on a copy
    (batch norm would update its statistics)."""
    probe = copy.deepcopy(model).train()
    for module in dropout_layers(probe):
        module.eval()
    runs = []
    for seed in (1, 2):
        calls = []
        record = lambda m, args, out, name: calls.append((name or type(m).__name__, m, args, out))  # noqa: E731
        handles = [m.register_forward_hook(lambda m, args, out, name=name: record(m, args, out, name))
                   for name, m in probe.named_modules()]
        try:
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(seed)
                probe(x)
        finally:
            for handle in handles:
                handle.remove()
        runs.append(calls)
    for (name, module, args_a, out_a), (_, _, args_b, out_b) in zip(*runs):
        same_in = all(not isinstance(a, torch.Tensor) or torch.equal(a, b) for a, b in zip(args_a, args_b))
        if same_in and isinstance(out_a, torch.Tensor) and not torch.equal(out_a, out_b):
            return f"{name} ({type(module).__name__})"
    return None


def save_model(path, model: nn.Module, spec: dict, extra: dict | None = None) -> None:
    """A plain dict of tensors and primitives, written atomically; loads with weights_only=True."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Serialised in memory first: torch.save onto a full disk fails with a RuntimeError that hides
    # the cause, a plain write raises ENOSPC, which atomic_write reports in one line.
    buffer = io.BytesIO()
    torch.save({"spec": spec, "state_dict": state, **(extra or {})}, buffer)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getbuffer()))


def read_checkpoint(path) -> dict:
    """The raw checkpoint dict, refusing anything that is not plain tensors and primitives."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found or not a file: {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle makes torch warn before it refuses: one line is enough
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's first line is advice to load unsafely: name the culprit instead
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it would import {found[1]}" if found else "unsupported pickle content"
        raise UserError(f"checkpoint {path} refused: it is not plain weights ({what})") from None
    except Exception as e:  # zip/EOF errors of a truncated or foreign file
        raise UserError(f"checkpoint {path} is unreadable: {type(e).__name__}") from None
    if not isinstance(ckpt, dict) or "spec" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"checkpoint {path} is not a dd-dist model (no spec/state_dict)")
    return ckpt


def load_model(path) -> tuple[nn.Module, dict]:
    ckpt = read_checkpoint(path)
    spec = ckpt["spec"]
    try:
        model = build_model(**spec)
    except TypeError:
        raise UserError(f"checkpoint {path} has a malformed model spec: {spec!r:.200}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise UserError(f"checkpoint {path} does not match its architecture {spec.get('arch')}") from None
    return model.eval(), spec


def check_fits(spec: dict, split, what: str) -> None:
    """Refuse, in one line, a model (its spec; `what` names it) whose input shape or classes are not `split`'s."""
    if tuple(spec["in_shape"]) != split.in_shape or spec["num_classes"] != split.num_classes:
        raise UserError(f"{what} takes {tuple(spec['in_shape'])} images with "
                        f"{spec['num_classes']} classes, but the {split.name} {split.split} split has "
                        f"{split.in_shape} with {split.num_classes}")


def init_student_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Ω ← Θ*. A student of the teacher's flat layout (a built-in net, at any distill.width) copies it, a
    narrower one keeping the teacher's strongest units (prune_into). Otherwise every tensor whose shape
    matches is copied, and the others get N(0, 0.01²) weights and zero biases; returns their names."""
    if _same_layout(student, teacher):
        prune_into(student, teacher)
        return []
    source, reset = teacher.state_dict(), []
    with torch.no_grad():
        for name, param in student.state_dict().items():
            if name in source and source[name].shape == param.shape:
                param.copy_(source[name])
            else:
                param.normal_(0, 0.01) if name.endswith("weight") else param.zero_()
                reset.append(name)
    return reset


def _same_layout(student: nn.Module, teacher: nn.Module) -> bool:
    """Both flat nets of the same layers, each weight layer at most as wide in the student."""
    if not (isinstance(student, nn.Sequential) and isinstance(teacher, nn.Sequential) and len(student) == len(teacher)):
        return False
    return all(type(s) is type(t) and (not hasattr(t, "weight") or (s.weight.shape[0] <= t.weight.shape[0]
                                                                      and s.weight.ndim == t.weight.ndim))
               for s, t in zip(student, teacher))


def prune_into(student: nn.Sequential, teacher: nn.Sequential) -> None:
    """A structured prune: each Conv2d / Linear of the student takes the teacher's units (filters, rows) of
    the largest L2 norm, as many as it has, in the teacher's order, restricted to the inputs from the units
    the layer before kept (after a Flatten, each kept channel's block of positions). The last layer keeps
    all its classes; everything between weight layers (ReLU, pooling, dropout) acts per unit."""
    kept, units = None, 0  # the previous weight layer's kept units, and how many the teacher's had
    with torch.no_grad():
        for s, t in zip(student, teacher):
            if not isinstance(t, (nn.Conv2d, nn.Linear)):
                continue
            weight = t.weight
            if kept is not None:
                positions = weight.shape[1] // units
                weight = weight[:, (kept[:, None] * positions + torch.arange(positions)).flatten()]
            strongest = t.weight.flatten(1).norm(dim=1).topk(s.weight.shape[0]).indices.sort().values
            s.weight.copy_(weight[strongest])
            if s.bias is not None:
                s.bias.copy_(t.bias[strongest])
            kept, units = strongest, t.weight.shape[0]
