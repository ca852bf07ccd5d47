"""The Python entry points: compute_bounds and friends.

A model is loaded and simplified once (cached by file identity, a ModelProto's serialized bytes,
or a torch module's identity and a digest of its tensors), a plan is made once per (model,
method, batch, spec rows, config) and cached, and each call only runs it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from boundflow.domains.rounding import down, round_outward, up
from boundflow.errors import DeviceError, ModelLoadError, ShapeError
from boundflow.ir.primal import Graph
from boundflow.ir.task import TORCH_DTYPES, BFTaskModule, of_kind
from boundflow.planner.config import PlannerConfig
from boundflow.planner.lower import METHODS
from boundflow.planner.pipeline import plan
from boundflow.runtime.device import resolve_device
from boundflow.runtime.python_executor import PythonTaskExecutor

_CACHE_SIZE = 16
_CPU = torch.device("cpu")
_graphs: OrderedDict = OrderedDict()
_plans: OrderedDict = OrderedDict()
_executor = PythonTaskExecutor()
_tvm_executors: dict = {}       # TVMExecutorOptions -> TVMTaskExecutor, made on first use


@dataclass
class BoundsResult:
    lb: torch.Tensor
    ub: torch.Tensor
    method: str
    stats: dict[str, Any] = field(default_factory=dict)
    # with PlannerConfig(export_intermediate=True): ReLU input -> stack(lower, upper) [2, B, *shape]
    intermediate: dict[str, torch.Tensor] = field(default_factory=dict)


def _remember(cache: OrderedDict, key, value):
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


class BoundedModel:
    """A model loaded once for many bound calls. `compute_bounds` and `bound` take it in place
    of the model itself and then skip what each call otherwise does to find the model in the
    cache: a stat of the file (a system call: ~3 us of mlp_small's IBP here, 15-25 us of the
    CIFAR nets', whose kernels leave the caches cold for it), the digest of a torch module's
    weights. So a file changed on disk, or weights changed in place, after it was made are not
    seen: make a new one."""

    def __init__(self, model, example_input: torch.Tensor | None = None):
        if isinstance(model, BoundedModel):
            model = model.source
        self.source = model
        self.graph, self.key = load_model(model, example_input)

    def bound(self, x_lower, x_upper, method: str = "crown", C=None, **options) -> BoundsResult:
        return bound(self, x_lower, x_upper, method, C, **options)

    def compute_bounds(self, x_lower, x_upper, method: str = "crown", C=None, **options):
        run = _bound(self, x_lower, x_upper, method, C, **options)
        return run.lb, run.ub


def load_model(model, example_input: torch.Tensor | None = None) -> tuple[Graph, Any]:
    """The simplified primal graph of `model` (ONNX path, onnx.ModelProto, torch.nn.Module or
    BoundedModel) and a cache key for it."""
    if isinstance(model, BoundedModel):
        return model.graph, model.key
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        try:
            st = os.stat(path)
        except OSError as e:
            raise ModelLoadError(f"model file not found: {path} ({e.strerror})") from e
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(f"model path is not a file: {path}")
        key = ("file", path, st.st_mtime_ns, st.st_size)
    elif isinstance(model, onnx.ModelProto):
        key = ("onnx", hashlib.sha256(model.SerializeToString()).hexdigest())
    elif isinstance(model, torch.nn.Module):
        if example_input is None:
            raise ShapeError("a torch.nn.Module needs an example input (x_lower gives its shape)")
        key = ("torch", id(model), tuple(example_input.shape), _module_digest(model))
    else:
        raise ModelLoadError(f"model must be an ONNX path, an onnx.ModelProto or a torch.nn.Module, "
                             f"not {type(model).__name__}")
    hit = _graphs.get(key)
    if hit is not None and hit[1] is (model if key[0] == "torch" else None):
        _graphs.move_to_end(key)
        return hit[0], key
    from boundflow.passes.simplify import simplify
    # (a caller's inference_mode must not make the weights inference tensors: alpha-CROWN's
    # autograd saves them, in this call or a later one that finds them cached)
    with torch.inference_mode(False):
        if key[0] == "torch":
            from boundflow.frontends.torch import load_torch
            graph = load_torch(model, example_input.clone() if example_input.is_inference() else example_input)
        else:
            from boundflow.frontends.onnx import load_onnx
            graph = load_onnx(model)
        graph = simplify(graph)
    _remember(_graphs, key, (graph, model if key[0] == "torch" else None))
    return graph, key


def _module_digest(model: torch.nn.Module) -> str:
    """A digest of what the export of `model` reads besides its code: its structure and
    hyperparameters (repr) and every tensor, parameter, buffer or plain attribute, byte by byte,
    so weights changed in place make a new cache key."""
    h = hashlib.sha256(repr(model).encode())
    for prefix, m in model.named_modules():
        tensors = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False), *vars(m).items()]
        for name, t in tensors:
            # an uninitialized lazy parameter has no bytes yet (the export then says so)
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
                h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def input_shape(model) -> tuple[int, ...]:
    graph, _ = load_model(model)
    return tuple(graph.shape(graph.inputs[0]))


def num_outputs(model) -> int:
    graph, _ = load_model(model)
    return graph.values[graph.outputs[0]].type.numel


def _as_tensor(x, what: str) -> torch.Tensor:
    """x as a tensor of its own float precision (float64 stays float64: it may be exact there)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{what} must be a torch tensor or numpy array, not {type(x).__name__}")
    if x.requires_grad:                  # (detach costs a new tensor per call: only when needed)
        x = x.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)



def _regions_shape(shape: tuple[int, ...], in_shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    """[B, *in_shape] for a box given with or without its leading batch dimension."""
    if shape == in_shape:
        return (1,) + in_shape
    if len(shape) == len(in_shape) + 1 and shape[1:] == in_shape:
        return shape
    if in_shape and in_shape[0] == 1 and len(shape) == len(in_shape) and shape[1:] == in_shape[1:]:
        return (shape[0],) + in_shape              # [B, ...] replacing the model's batch of 1
    raise ShapeError(f"{what} has shape {list(shape)}; the model's input has shape {list(in_shape)} "
                     f"(a leading batch dimension of B regions may be added)")


def _check_box(lo: torch.Tensor, hi: torch.Tensor, shape: tuple[int, ...]) -> None:
    """An error for a box with NaN or infinite bounds or a lower bound above its upper one
    (positions as indices of `shape`, the regions' [B, *input shape])."""
    if lo.numel():
        # one pass finds every bad box: hi - lo is NaN or infinite where a bound is, and < 0
        # where they cross (NaN is both the min and the max); a finite box wider than the
        # dtype's range passes the exact checks below
        least, most = torch.sub(hi, lo).aminmax()
        if not (least.item() >= 0 and math.isfinite(most.item())):
            if not all(map(math.isfinite, (*lo.aminmax(), *hi.aminmax()))):
                raise ShapeError("the input box contains NaN or infinite bounds")
            lo, hi = lo.reshape(shape), hi.reshape(shape)
            bad = (lo > hi).nonzero()
            if len(bad):
                i = tuple(bad[0].tolist())
                raise ShapeError(f"x_lower > x_upper at {len(bad)} position(s), first at index {list(i)}: "
                                 f"{lo[i].item()} > {hi[i].item()}")


def _write_box(lo: torch.Tensor, hi: torch.Tensor, out: torch.Tensor) -> None:
    """stack(lo, hi) into the plan's input `out` ([2, B, *input shape]), rounded outward to
    its dtype."""
    if lo.dtype == out.dtype and lo.device == out.device:
        # (written in place: no tensor in between; view(*shape): a tuple argument costs
        # torch's parser twice as much)
        torch.stack((lo, hi), out=out.view(2, *lo.shape))
    else:
        out.copy_(round_outward(torch.stack((lo, hi)), out.dtype).view(out.shape))


def _spec(C, batch: int, num_out: int, device: str) -> torch.Tensor:
    """C checked, on `device`: [S, num_out] (one spec for every region) or [batch, S, num_out],
    as it was given (the plan's input [batch, S, num_out] takes either)."""
    C = _as_tensor(C, "C")
    if device != "cpu" or C.device != _CPU:          # (a no-op .to is still a dispatch per call)
        C = C.to(device)
    if C.dim() not in (2, 3) or C.dim() == 3 and C.shape[0] != batch or C.shape[-1] != num_out:
        raise ShapeError(f"C has shape {list(C.shape)}; expected [S, {num_out}] or [{batch}, S, {num_out}]")
    # (one reduction: the sum is finite unless an entry is NaN or infinite, or finite entries'
    # sum overflows, which the exact check then clears)
    if not math.isfinite(C.sum().item()) and not torch.isfinite(C).all():
        raise ShapeError("C contains NaN or infinite entries")
    return C


def _spec_rows(C: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the spec the plan bounds, the part of C it loses). A C that `dtype` holds exactly is
    bounded as it is; otherwise its rounding E = C - C' is covered by bounding the outputs too
    (identity rows appended), see _correct."""
    if C.dtype == dtype:
        return C, None
    rounded = C.to(dtype)
    err = C - rounded.to(C.dtype)
    if not err.any():
        return rounded, None
    eye = torch.eye(C.shape[-1], dtype=dtype, device=C.device).expand(*C.shape[:-2], -1, -1)
    return torch.cat([rounded, eye], -2), err


def _correct(lb: torch.Tensor, ub: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of C y from those of C' y and y (appended rows): C y = C' y + E y and
    |E y| <= |E| max(|y_lo|, |y_hi|), in float64, rounded outward back to lb's dtype."""
    S = err.shape[-2]
    y_abs = torch.maximum(lb[:, S:].abs(), ub[:, S:].abs()).double()
    # (err [S, O] or [B, S, O]; doubled: its rounding)
    slack = 2 * torch.matmul(err.abs().double(), y_abs.unsqueeze(-1)).squeeze(-1)
    box = torch.stack((down(lb[:, :S].double() - slack), up(ub[:, :S].double() + slack)))
    return tuple(round_outward(box, lb.dtype))


def _own_inputs(module: BFTaskModule) -> dict[str, torch.Tensor]:
    """Tensors of their own for the box and C: alpha-CROWN's passes read them throughout its
    optimisation, not in one run."""
    specs = {role: module.buffers[module.inputs[role]] for role in ("box", "C") if role in module.inputs}
    return {role: torch.empty(spec.shape, dtype=TORCH_DTYPES[spec.dtype], device=module.device)
            for role, spec in specs.items()}


@functools.lru_cache(maxsize=None)
def _default_config(crown_interm: str) -> PlannerConfig:
    return PlannerConfig(crown_interm=crown_interm)


def get_plan(graph: Graph, graph_key, method: str, batch: int, spec_rows: int | None,
             config: PlannerConfig) -> tuple[BFTaskModule, bool]:
    key = (graph_key, method, batch, spec_rows, config)
    hit = _plans.get(key)
    if hit is not None:
        _plans.move_to_end(key)
        return hit, True
    with torch.inference_mode(False):              # (as in load_model: its params are cached)
        module = plan(graph, method, config, batch=batch, spec_rows=spec_rows)
    return _remember(_plans, key, module), False


def _get_executor(executor: str, tvm_options, method: str, sound_fp: bool, device: str):
    """The executor that runs plans: PythonTaskExecutor, or one TVMTaskExecutor per options
    (so its compiled modules are reused across calls)."""
    if executor == "python":
        if tvm_options is not None:
            raise ValueError("tvm_options only applies with executor='tvm'")
        return _executor
    if executor != "tvm":
        raise ValueError(f"unknown executor {executor!r}; available: 'python', 'tvm'")
    if device != "cpu":
        raise DeviceError(f"executor='tvm' compiles for the CPU only, not for device {device!r}: use "
                          "device='cpu' with it (or executor='python' on the GPU)")
    if sound_fp:
        raise ValueError("sound_fp plans run on executor='python' (the TVM lowering has no floating-point "
                         "error rules)")
    if method == "alpha-crown":
        raise ValueError("alpha-crown optimises its slopes through torch autograd: use executor='python'")
    from boundflow.runtime.tvm_executor import TVMExecutorOptions, TVMTaskExecutor
    options = tvm_options or TVMExecutorOptions()
    hit = _tvm_executors.get(options)
    if hit is None:
        hit = _tvm_executors[options] = TVMTaskExecutor(options)
    return hit


class _Run(NamedTuple):
    """What one call computed (bound() adds its stats; compute_bounds keeps lb and ub)."""
    lb: torch.Tensor
    ub: torch.Tensor
    outputs: dict
    module: BFTaskModule
    cached: bool
    planned: float                       # perf_counter when the plan was found
    extra: dict
    home: torch.device
    device: str
    runner: Any


def _bound(model, x_lower, x_upper, method: str = "crown", C=None, *, crown_interm: str = "sparse",
           config: PlannerConfig | None = None, executor: str = "python", alpha=None,
           tvm_options=None, sound_fp: bool = False, deadline: float | None = None,
           device: str = "auto") -> _Run:
    """The bounds (see bound for the options), and what bound's statistics are made of."""
    method = method.lower()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    config = config or _default_config(crown_interm)
    if sound_fp and not config.sound_fp:
        config = dataclasses.replace(config, sound_fp=True)
    device = resolve_device(device)
    if config.device != device:
        config = dataclasses.replace(config, device=device)
    runner = _get_executor(executor, tvm_options, method, config.sound_fp, device)
    dtype = TORCH_DTYPES[config.fp_dtype] if config.sound_fp else torch.float32
    lo, hi = _as_tensor(x_lower, "x_lower"), _as_tensor(x_upper, "x_upper")
    if lo.shape != hi.shape:
        raise ShapeError(f"x_lower has shape {list(lo.shape)} but x_upper has shape {list(hi.shape)}")
    home = lo.device
    example = None                                 # (a module's export needs one region)
    if isinstance(model, torch.nn.Module):
        example = lo if lo.dim() == 0 or lo.shape[0] == 1 else lo[:1]
    graph, key = load_model(model, example)
    shape = _regions_shape(tuple(lo.shape), tuple(graph.shape(graph.inputs[0])), "x_lower")
    _check_box(lo, hi, shape)
    c_err = None
    if C is not None:
        C, c_err = _spec_rows(_spec(C, shape[0], graph.values[graph.outputs[0]].type.numel, device), dtype)
    module, cached = get_plan(graph, key, method, shape[0], None if C is None else C.shape[-2], config)
    planned = time.perf_counter()
    # the box and C are written where the run reads them (no tensor in between)
    into = runner.prepare(module).inputs if method != "alpha-crown" else _own_inputs(module)
    inputs = {"box": into["box"]}
    _write_box(lo, hi, inputs["box"])
    if C is not None:
        inputs["C"] = into["C"]
        inputs["C"].copy_(C)                       # ([S, O]: the same spec for every region)
    extra = {}
    if method == "alpha-crown":
        from boundflow.verify.alpha import AlphaConfig, optimize
        outputs, extra = optimize(module, inputs, _executor, alpha or AlphaConfig(), deadline)
    else:
        outputs = runner.run(module, inputs)
    lb, ub = outputs["bounds"].unbind(0)
    if c_err is not None:
        lb, ub = _correct(lb, ub, c_err)
    if device != "cpu" or home != _CPU:
        lb, ub = lb.to(home), ub.to(home)
    return _Run(lb, ub, outputs, module, cached, planned, extra, home, device, runner)


def bound(model, x_lower, x_upper, method: str = "crown", C=None, **options) -> BoundsResult:
    """Certified bounds of C @ f(x) (of f(x) when C is None) over the box [x_lower, x_upper],
    with the call's statistics. Options (keywords): crown_interm ("sparse", "intersect" or
    "pure"), config (a PlannerConfig), executor: "python" (torch kernels) or "tvm"
    (TVM-compiled tasks, options in tvm_options, a
    boundflow.runtime.tvm_executor.TVMExecutorOptions; needs pip install -e ".[tvm]"), alpha (an
    AlphaConfig, for alpha-crown).
    sound_fp: bounds sound in floating point (every rounding error bounded, see domains/fp.py;
    also PlannerConfig(sound_fp=True)); lb and ub are then float64 (float32 with
    config=PlannerConfig(fp_dtype="float32"): faster, for linear layers, ReLUs and affine maps).
    deadline (a time.perf_counter value): alpha-crown starts no optimisation step that would
    end past it (its bounds are then the best found so far); the other methods cannot stop.
    device: "auto" (CUDA when torch sees it, else the CPU), "cpu", "cuda" or "cuda:N": where
    the plan's parameters, arenas and kernels live (it sets config.device). The box and C move
    there once; lb, ub and the intermediate bounds come back on the device x_lower is on (the
    CPU for numpy arrays)."""
    t0 = time.perf_counter()
    run = _bound(model, x_lower, x_upper, method, C, **options)
    intermediate = {}
    if len(run.outputs) > 1:
        intermediate = {role.value: run.outputs[role].to(run.home) for role in of_kind(run.outputs, "interm")}
    if run.device.startswith("cuda"):                # run_ms: the kernels' time, not their launch
        torch.cuda.synchronize(run.device)
    t2 = time.perf_counter()
    executor, extra = options.get("executor", "python"), run.extra
    if executor == "tvm":
        extra = dict(extra, tvm=run.runner.compile_stats(run.module))
    stats = dict(run.module.stats, plan_ms=(run.planned - t0) * 1e3, run_ms=(t2 - run.planned) * 1e3,
                 plan_cached=run.cached, executor=executor, device=run.device, config=run.module.config_dump,
                 **extra)
    return BoundsResult(run.lb, run.ub, method.lower(), stats, intermediate)


def compute_bounds(model, x_lower, x_upper, method: str = "crown", C=None, **options):
    """lb, ub = compute_bounds(model, x_lower, x_upper, method="crown", C=None)

    model: ONNX path, onnx.ModelProto, torch.nn.Module (x_lower then gives the input shape), or
    a BoundedModel (loaded once: the fastest for many calls).
    x_lower, x_upper: the input box, with the model's input shape, optionally with a leading
    axis of B regions. method: "ibp", "crown", "crown-ibp" or "alpha-crown". C: None, [S, O] or
    [B, S, O]. Options: crown_interm="sparse"|"intersect"|"pure", config=PlannerConfig(...),
    alpha=boundflow.verify.alpha.AlphaConfig(...) for alpha-crown, executor="python"|"tvm" and
    tvm_options=TVMExecutorOptions(...) (pip install -e ".[tvm]"), sound_fp=True,
    device="auto"|"cpu"|"cuda" (default "auto": CUDA when torch sees it; see bound).
    Returns lb, ub of shape [B, S] ([B, O] when C is None).
    """
    run = _bound(model, x_lower, x_upper, method, C, **options)
    return run.lb, run.ub
