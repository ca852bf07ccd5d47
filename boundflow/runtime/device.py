"""Which device a plan runs on, and the float32 arithmetic it runs in there.

Users name "auto", "cpu", "cuda" or "cuda:N" (`resolve_device`). The planner and the
executors take any torch device (PlannerConfig.device), "meta" included, which tests use to
check that every tensor a plan makes lives on its device.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from boundflow.errors import DeviceError

USER_DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> str:
    """The torch device string for a user's choice: "auto" is "cuda" when torch sees a CUDA
    device and "cpu" otherwise; "cuda" / "cuda:N" must exist."""
    if name == "cpu":                     # (the common case, without a torch.device: per call)
        return name
    if not isinstance(name, str):
        raise DeviceError(f"device must be a string ({', '.join(USER_DEVICES)} or cuda:N), not {type(name).__name__}")
    if name == "auto":
        return _auto()
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(USER_DEVICES)} or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: torch sees no CUDA device here (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda or 'no'}); use device 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


@functools.cache
def _auto() -> str:
    """What "auto" means: a process sees the same devices throughout (asked once: the
    question is ~2 us of Python per bound call)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def ieee_float32(device: torch.device):
    """On a CUDA device, float32 matmuls and convolutions in IEEE float32, not TF32 (10-bit
    mantissa; cuDNN's default for convolutions): the bounds are computed in float32 as on
    the CPU. Elsewhere nothing changes (a shared no-op context: runs are short)."""
    return _cuda_ieee_float32() if device.type == "cuda" else NO_CONTEXT


NO_CONTEXT = contextlib.nullcontext()


@contextlib.contextmanager
def _cuda_ieee_float32():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


@functools.lru_cache(maxsize=4096)
def constant(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`data` (a tuple, a number or a module-level tensor, cached by identity) as a tensor on
    `device`, made once per device: kernels read their small constants (index lists, lookup
    tables) without a host-to-device copy per call. Never modify the result. Made outside
    inference mode even when first asked for inside it (the executor's runs): autograd may save
    it later (alpha-CROWN)."""
    with torch.inference_mode(False):
        return torch.as_tensor(data, dtype=dtype, device=device)
