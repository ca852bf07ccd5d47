"""The operator registry: every primal op is one `Op`, defined in one module of boundflow.ops.

An Op holds everything the rest of BoundFlow needs to know about the op:

  forward     its semantics on [B, *shape] tensors, fn(*inputs, attrs=...); also its shape rule
              (shape inference runs it on small zero tensors)
  interval    its IBP kernel, "interval.<name>"
  backward    its CROWN backward kernel, "linear.<name>": (A on the output, bias, ...) -> (A on
              each variable input, bias); None when A passes unchanged to every input (a sum)
  fp          for ops whose arithmetic rounds, "fp.<name>": (input intervals, rounded output
              interval) -> (widened interval, error vector) (sound_fp plans; domains/fp.py)
  relaxation  for a nonlinear op, how lines bound it (see Relaxation); its backward rule then
              reads the lines
  matrix      for an affine map, its matrix (a backward pass from its output starts there)
  *_params    the plan-time parameters of the kernels, from the graph's constants
  kernels     any further kernels by full name (patch rules, ...)

Kernels share one signature everywhere: fn(inputs, params, attrs) -> tuple of tensors. The
planner, the executors, alpha-CROWN, branch and bound and the attack look ops up here and never
name an op's math themselves.

The module of an op family also maps the frontends' ops onto its primal ops: functions
registered with `onnx_lowering("Gemm", ...)` and `torch_lowering(aten.linear.default, ...)`,
fn(builder) -> the primal value of the source node's output (boundflow/frontends/builder.py).
The frontends look every mapping up in ONNX_LOWERINGS and TORCH_LOWERINGS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from boundflow.errors import UnsupportedOpError

Kernel = Callable[..., tuple]
ParamFn = Callable[..., list]          # fn(graph, node, dtype) -> plan-time parameter tensors


def constants(graph, node, dtype=torch.float32) -> list[torch.Tensor]:
    """The node's constant inputs, in order (the default parameters of every kernel)."""
    return [graph.data(i) for i in node.inputs if not graph.is_variable(i)]


@dataclass(frozen=True)
class Relaxation:
    """Lines that bound a nonlinear op over its input interval, for the backward passes.

    relax       "<op>.relax": stack(lower, upper) of the input (of each of the first `inputs`
                inputs; then the op's backward_params) -> the lines' coefficients, [rows, B,
                *shape] (shape: the input's, or as `lines_shape` says), which every backward
                rule of the op reads
    fp          "fp.<op>_lines": (input intervals, lines) -> (error vector of the backward rules,)
    optimised   "linear.<op>_alpha": the backward rule with optimisable parameters in [0, 1],
                `params` of them per row of A and neuron of the lines ([B, params, rows, *shape],
                or [B, rows, *shape] for one: param_lead), given as an input (None: the plain
                lines), and
                split multipliers (beta-CROWN) when it `splits_at_zero`
    start       (task op of `optimised`, env: buffer -> tensor of a run without the parameters)
                -> the parameters' starting value
    patch, patch_optimised, patch_start: the same on receptive-field windows (domains/patches.py)
    """
    relax: Kernel
    rows: int
    fp: Kernel
    optimised: Kernel
    start: Callable
    patch: Kernel | None = None
    patch_optimised: Kernel | None = None
    patch_start: Callable | None = None
    params: int = 1
    # per-region shape of the lines (rows first) and parameter count when they depend on the
    # node (fn(graph, node)): maxpool's live on its output, one weight per window element
    lines_shape: Callable | None = None
    params_of: Callable | None = None
    # a CROWN refinement of the op's input may skip the neurons whose interval bounds already
    # make the op linear (bound.unstable: l < 0 < u, the ReLU's case); otherwise every neuron
    sparse_refine: bool = False
    # ReLU branch and bound may split its input at 0: `optimised` then takes split multipliers
    splits_at_zero: bool = False
    # where branch and bound cuts the input of an op it does not split at 0, fn(graph, node) ->
    # [*input shape]: a kink, where the op is linear on both sides (None: the interval's midpoint)
    kink: Callable | None = None
    # how many leading inputs of the op the lines read ("<op>.relax" and "fp.<op>_lines" take
    # their intervals, in order): 2 for a product of two variables
    inputs: int = 1

    def shape(self, graph, node) -> tuple[int, ...]:
        """Per-region shape of the lines, rows first."""
        if self.lines_shape is not None:
            return tuple(self.lines_shape(graph, node))
        return (self.rows,) + tuple(graph.shape(node.inputs[0]))

    def param_lead(self, graph, node) -> tuple[int, ...]:
        """The parameters' axis of `optimised`'s input, after the region axis: none for one per
        row and neuron, else their count (a node-dependent count keeps its axis even at 1:
        a 1x1 max pool's window has one weight)."""
        if self.params_of is not None:
            return (self.params_of(graph, node),)
        return (self.params,) if self.params > 1 else ()

    def relaxed(self, node) -> list[str]:
        """The inputs whose intervals the lines read (the intermediate bounds the op needs)."""
        return list(node.inputs[:self.inputs])


@dataclass(frozen=True)
class Op:
    name: str
    forward: Callable[..., torch.Tensor]
    interval: Kernel
    backward: Kernel | None = None
    fp: Kernel | None = None
    # an affine map that mixes coordinates: interval bounds are exact after one such op, not two
    mixing: bool = False
    # maps boxes onto boxes coordinate by coordinate, so interval bounds through it stay exact
    coordinatewise: bool = False
    relaxation: Relaxation | None = None
    # the op as a matrix on its flattened input, fn(graph, node, dtype, max_bytes) -> (rows
    # [out numel, in numel], bias [out numel]), or None where it is not one (or too big): a
    # backward pass from its output starts from these rows (linear.start_rows)
    matrix: Callable | None = None
    interval_params: ParamFn = constants
    backward_params: ParamFn = constants
    fp_params: ParamFn | None = None
    # its error rules (fp, the relaxation's fp, fp_params) hold in float32 sound_fp plans too,
    # not only in float64 ones (ops that round nothing need not say)
    fp32: bool = False
    # its fp rule's error vector reads its inputs' intervals only, not its own output's (raw may
    # be None): where nothing reads the op's interval (beta-crown plans give the ReLUs' inputs
    # their bounds) a sound plan computes the vector alone, kernel "fp.<name>_error"
    error_of_inputs: bool = False
    backward_attrs: Callable[..., dict] = lambda graph, node: {}
    kernels: dict[str, Kernel] = field(default_factory=dict)
    # kernels (full names) whose results may be views of their inputs (the storage plan must know)
    aliasing: frozenset[str] = frozenset()
    # among those, kernels whose every result is its same-position input's bytes read in another
    # shape (a reshape of a contiguous tensor): the storage plan gives each result its input's
    # bytes, and the executor then has nothing to run (planner/memory.py, view_aliases)
    views: frozenset[str] = frozenset()

    def all_kernels(self) -> dict[str, Kernel]:
        out = {f"interval.{self.name}": self.interval}
        if self.backward is not None:
            out[f"linear.{self.name}"] = self.backward
        if self.fp is not None:
            out[f"fp.{self.name}"] = self.fp
            if self.error_of_inputs:
                out[f"fp.{self.name}_error"] = _error_alone(self.fp)
        r = self.relaxation
        if r is not None:
            out.update({f"{self.name}.relax": r.relax, f"fp.{self.name}_lines": r.fp,
                        f"linear.{self.name}_alpha": r.optimised})
            if r.patch is not None:
                out.update({f"linear.patch_{self.name}": r.patch, f"linear.patch_{self.name}_alpha": r.patch_optimised})
        return {**out, **self.kernels}

    def alpha_starts(self) -> dict[str, Callable]:
        """Optimised kernel name -> how its parameters start (alpha-CROWN): fn(task op, env)."""
        r = self.relaxation
        if r is None:
            return {}
        out = {f"linear.{self.name}_alpha": r.start}
        if r.patch_start is not None:
            out[f"linear.patch_{self.name}_alpha"] = r.patch_start
        return out


def _error_alone(fp: Kernel) -> Kernel:
    """fp(inputs + [raw]) -> (widened, e) as inputs -> (e,): the rule run without its raw interval."""
    def kernel(ins, ps, attrs):
        return fp([*ins, None], ps, attrs)[1:]
    return kernel


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is registered twice")
    OPS[op.name] = op
    return op


def get(name: str) -> Op:
    op = OPS.get(name)
    if op is None:
        raise UnsupportedOpError(f"no primal op {name!r}; registered: {', '.join(sorted(OPS))}")
    return op


# -- frontend mappings ----------------------------------------------------------------------------
Lowering = Callable[..., Any]          # fn(builder) -> primal value name (or the frontend's entry)

ONNX_LOWERINGS: dict[str, Lowering] = {}       # ONNX op type -> lowering
# ONNX graph rewrites run before lowering, fn(nodes, constants {name: array}) -> nodes: they fuse
# a pattern of several nodes into one op that has a lowering (erf-form GELU into Gelu)
ONNX_REWRITES: list[Callable[[list, dict], list]] = []
TORCH_LOWERINGS: dict[Any, Lowering] = {}      # torch.export target (an aten OpOverload) -> lowering
# targets the torch frontend keeps whole instead of decomposing to core ATen (softplus, prelu:
# their decompositions are where/log1p/exp chains no lowering could read back)
TORCH_KEEP_WHOLE: set[Any] = set()


def _registrar(table: dict, keys: tuple) -> Callable[[Lowering], Lowering]:
    def register_lowering(fn: Lowering) -> Lowering:
        for key in keys:
            if key in table:
                raise ValueError(f"{key} has two lowerings: {table[key].__qualname__} and {fn.__qualname__}")
        table.update(dict.fromkeys(keys, fn))
        return fn
    return register_lowering


def onnx_lowering(*op_types: str) -> Callable[[Lowering], Lowering]:
    """Decorator: the function lowers these ONNX op types (nodes with a variable input)."""
    return _registrar(ONNX_LOWERINGS, op_types)


def onnx_rewrite(fn: Callable[[list, dict], list]) -> Callable[[list, dict], list]:
    """Decorator: the function rewrites the ONNX node list before lowering (ONNX_REWRITES)."""
    ONNX_REWRITES.append(fn)
    return fn


def torch_lowering(*targets, keep_whole: bool = False) -> Callable[[Lowering], Lowering]:
    """Decorator: the function lowers FX nodes calling these targets (with a variable input);
    keep_whole: torch.export must not decompose them."""
    if keep_whole:
        TORCH_KEEP_WHOLE.update(targets)
    return _registrar(TORCH_LOWERINGS, targets)
