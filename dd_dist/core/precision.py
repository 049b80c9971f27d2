"""Mixed precision for the inference stages (label, evaluate): torch.autocast around a teacher's or a
student's forward passes. The softmax, the MC mean and every spread over masks stay in float32
(dd_dist.core.mc.softmax), so only the layers round: the label's distance to float32 is the network's."""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from dd_dist.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | str, key: str = "precision") -> None:
    """A one-line UserError naming the config `key` unless this device computes in `precision` (autocast
    really lowers a Linear to it)."""
    if precision not in PRECISIONS:
        raise UserError(f"{key}: {precision!r} is not one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp32":
        return
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{key}: {precision} was asked for, but {torch.cuda.get_device_name(device)} has no bfloat16")
    try:
        ones = torch.ones(2, 2, device=device)
        with warnings.catch_warnings(), torch.autocast(device.type, dtype=HALF[precision]):
            warnings.simplefilter("ignore")  # autocast warns and turns itself off where a dtype is unsupported
            lowered = F.linear(ones, ones).dtype == HALF[precision]
    except RuntimeError:  # no autocast at all on this kind of device
        lowered = False
    if not lowered:
        raise UserError(f"{key}: {precision} was asked for, but torch {torch.__version__} cannot compute in it on "
                        f"{device.type}")


def autocast(precision: str, device: torch.device | str):
    """The context the forward passes run in: nothing for fp32, else torch.autocast to bf16 / fp16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=HALF[precision])
