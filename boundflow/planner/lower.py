"""Lower a primal graph, for one bound method, to a flat list of TaskOps over logical buffers.

Every op's rules come from the registry (boundflow.ops); a relaxed op (ReLU, sigmoid, ...: an
ops.Relaxation) is bounded by lines computed from its input's interval.

  ibp        interval rules node by node; C folded into a last linear op, else applied to the box
  crown-ibp  interval intermediate bounds, one CROWN backward pass for the output
  crown      as crown-ibp, but every relaxed op's input (both of a product's) is refined by a
             CROWN backward pass as soon as its interval is known (config.crown_interm says
             how), so later intervals start from refined bounds
  alpha-crown  as crown, but every backward pass reads the relaxations' parameters (the ReLU's
             lower slopes, sigmoid's tangent points) from module inputs
             Role("alpha", <relaxed op's output>, <target>) ([B, params?, rows of A, *shape]),
             which an optimiser tunes (boundflow.verify.alpha), as auto_LiRPA does: one set per
             (relaxed op, bounded value) pair, intermediate bounds recomputed with theirs
  beta-crown (for branch and bound on ReLU splits; not a user method) one CROWN backward pass
             for the output from intermediate bounds given as inputs
             Role("interm", <relaxed input>) ([2, B, *shape], already clamped by the domain's
             splits), with slopes Role("alpha", <relaxed op's output>, <output>) and signed
             split multipliers Role("beta", <relu input>, <output>) (boundflow.verify.relu_bab);
             lower bounds only (the upper bounds come out as +inf)

With config.export_intermediate, the final interval of every relaxed op's input is also an
output, Role("interm", <input>) (the starting point of ReLU branch and bound).

With config.sound_fp the plan computes in config.fp_dtype (float64, or float32 where every op's
error rules are written for it: Op.fp32) and is sound in floating point: after each
rounding op's interval rule an "fp.<op>" op widens the interval by the op's error vector
(domains/fp.py), every backward rule through it reads that vector and widens its bias, fan-in
sums and the final concretization add their own rounding, and everything is rounded outward.
beta-crown then also runs the interval pass (the error vectors need every value's magnitude).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from boundflow import ops
from boundflow.domains import fp
from boundflow.errors import ShapeError, UnsupportedOpError
from boundflow.ir.primal import Graph, Node
from boundflow.ir.task import TORCH_DTYPES, BufferSpec, Role, TaskOp
from boundflow.planner.config import PlannerConfig

METHODS = ("ibp", "crown", "crown-ibp", "alpha-crown")
SPLIT_METHOD = "beta-crown"
_REFINED = ("crown", "alpha-crown")            # methods that refine ReLU inputs with CROWN
_LINEAR = ("crown", "crown-ibp", "alpha-crown", SPLIT_METHOD)  # bound the output with CROWN
_OPTIMISED = ("alpha-crown", SPLIT_METHOD)     # backward passes read their slopes from inputs


@dataclass
class Lowered:
    ops: list[TaskOp] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)          # one label per op, for partitioning
    buffers: dict[int, BufferSpec] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)


class _Emitter:
    def __init__(self, batch: int, dtype: str):
        self.batch = batch
        self.dtype = dtype                  # of every float buffer and parameter
        self.out = Lowered()
        self._sources: dict[int, tuple[str, torch.Tensor]] = {}   # id(source tensor) -> (param, tensor)
        self.phase = "forward"

    def buffer(self, name, shape, dtype=None, dynamic_axis=None, role="state", layout=None) -> int:
        bid = len(self.out.buffers)
        self.out.buffers[bid] = BufferSpec(bid, name, tuple(int(d) for d in shape), dtype or self.dtype, layout,
                                           role, dynamic_axis)
        return bid

    def param(self, name: str, tensor: torch.Tensor | None) -> str | None:
        """The plan parameter `name` holding tensor (in the plan's dtype); a tensor already
        given under another name (a weight both a start and a backward rule read) is shared."""
        if tensor is None:
            return None
        known = self._sources.get(id(tensor))
        if known is not None and known[1] is tensor:
            return known[0]
        if name not in self.out.params:
            t = tensor.detach().to(TORCH_DTYPES[self.dtype])
            # (dense; a conv weight a rule stores channels-last keeps that layout: conv's lu conv)
            dense = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
            self.out.params[name] = t if dense else t.contiguous()
            self._sources[id(tensor)] = (name, tensor)
        return name

    def params(self, prefix: str, tensors) -> list[str | None]:
        return [self.param(f"{prefix}{k}", t) for k, t in enumerate(tensors)]

    def emit(self, op, inputs, outputs, params=(), attrs=None, source="", layout=None):
        self.out.ops.append(TaskOp(op, list(inputs), list(outputs), list(params), dict(attrs or {}), layout, source))
        self.out.phases.append(self.phase)


def relaxed_nodes(graph: Graph, splitting: bool = False) -> list[Node]:
    """Every relaxed op (ops.Relaxation) of `graph`, in node order; with `splitting`, only the
    ops ReLU branch and bound splits (Relaxation.splits_at_zero)."""
    return [n for n in graph.nodes if ops.get(n.op).relaxation is not None and
            (not splitting or ops.get(n.op).relaxation.splits_at_zero)]


def relaxed_inputs(graph: Graph, splitting: bool = False) -> list[str]:
    """The inputs whose intervals the relaxed ops read (both of a product's:
    Relaxation.relaxed), once each, in node order: what beta-crown plans read intermediate
    bounds of (their slopes are per op: Role("alpha", <op output>, <target>)), and with
    `splitting` the neurons ReLU branch and bound splits."""
    return list(dict.fromkeys(v for n in relaxed_nodes(graph, splitting) for v in ops.get(n.op).relaxation.relaxed(n)))


def fp32_refusal(graph: Graph) -> Node | None:
    """The first node of `graph` that rounds without error rules for float32 sound_fp plans
    (Op.fp32), or None when a float32 sound plan can bound it."""
    for node in graph.nodes:
        op = ops.get(node.op)
        if (op.fp is not None or op.relaxation is not None) and not op.fp32:
            return node
    return None


def check_fp32(graph: Graph) -> None:
    node = fp32_refusal(graph)
    if node is not None:
        raise UnsupportedOpError(f"sound_fp in float32: node {node.name!r} ({node.op}) has error rules for "
                                 "float64 plans only (use fp_dtype='float64')")


def _unit_lead(shape) -> bool:
    return math.prod(shape[:-1]) == 1


def interval_is_exact(graph: Graph, value: str) -> bool:
    """True when interval arithmetic already gives the exact range of every coordinate of
    `value`: a single-input chain from the network input with at most one mixing op."""
    producer = graph.producer()
    mixing, v = 0, value
    while v != graph.inputs[0]:
        node = producer[v]
        op = ops.get(node.op)
        if op.mixing:
            mixing += 1
        elif not op.coordinatewise:
            return False
        var = [i for i in node.inputs if graph.is_variable(i)]
        if len(var) != 1:
            return False
        v = var[0]
    return mixing <= 1


def _elementwise(graph: Graph, node: Node) -> bool:
    """A node whose interval rule maps a box onto its exact image, coordinate by coordinate
    (ops.Op.coordinatewise), from one variable input of its output's shape."""
    var = [i for i in node.inputs if graph.is_variable(i)]
    return ops.get(node.op).coordinatewise and len(var) == 1 and \
        tuple(graph.shape(var[0])) == tuple(graph.shape(node.outputs[0]))


def _ancestors(graph: Graph, value: str) -> set[str]:
    producer, seen, stack = graph.producer(), set(), [value]
    while stack:
        v = stack.pop()
        if v in seen or v not in producer:
            continue
        seen.add(v)
        stack.extend(i for i in producer[v].inputs if graph.is_variable(i))
    return seen


# -- patch geometry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """Where a patch pass keeps A on a value: one window [C, ph, pw] per row, the window of the
    target neuron at (i, j) starting at (i S - P, j T - Q); grid = (S, T, P, Q)."""

    window: tuple[int, int, int]
    grid: tuple[int, int, int, int]


def _patch_value(shape) -> bool:
    shape = tuple(shape)
    return len(shape) == 3 or (len(shape) == 4 and shape[0] == 1)


def _patch_rule(node: Node) -> str:
    """The kernel of an elementwise op's patch rule (its relaxation's, or a kernel
    "linear.patch_<op>" of its own), or "" where it has none."""
    op = ops.get(node.op)
    if op.relaxation is not None:
        return f"linear.patch_{node.op}" if op.relaxation.patch is not None else ""
    return f"linear.patch_{node.op}" if f"linear.patch_{node.op}" in op.kernels else ""


def _patchable(g: Graph, node: Node) -> bool:
    """A node a patch pass goes through: a 2-d conv without groups or dilation, a sum of two
    values, or an elementwise op with a patch rule (ReLU, clamp, affine map), over [C, H, W]
    values."""
    if node.op == "conv2d":
        if node.attrs["groups"] != 1 or tuple(node.attrs["dilation"]) != (1, 1):
            return False
    elif node.op != "add" and not (_elementwise(g, node) and _patch_rule(node)):
        return False
    return all(_patch_value(g.shape(v)) for v in node.inputs + node.outputs if g.is_variable(v))


def _patch_start_geometry(g: Graph, node0: Node) -> Geometry:
    """A at the start of a pass: the target conv's kernel on its input, else 1 x 1 windows on
    the target itself (one-hot rows)."""
    if node0.op == "conv2d":
        (s, t), pad = node0.attrs["stride"], node0.attrs["padding"]
        return Geometry(tuple(g.data(node0.inputs[1]).shape[1:]), (s, t, pad[0], pad[1]))
    return Geometry((g.shape(node0.outputs[0])[-3], 1, 1), (1, 1, 0, 0))


def _through(g: Graph, node: Node, geo: Geometry) -> Geometry:
    """The geometry of A on a node's input given that on its output: a conv's window grows by
    its kernel's reach; a ReLU or a sum keeps it."""
    if node.op != "conv2d":
        return geo
    (cs, ct), pad = node.attrs["stride"], node.attrs["padding"]
    c_in, kh, kw = g.data(node.inputs[1]).shape[1:]
    (_, ph, pw), (s, t, p, q) = geo.window, geo.grid
    return Geometry((c_in, (ph - 1) * cs + kh, (pw - 1) * ct + kw), (s * cs, t * ct, p * cs + pad[0], q * ct + pad[1]))


def _union(geos: list[Geometry]) -> Geometry | None:
    """The smallest window holding every geometry's window (None when their strides differ:
    their windows move apart from one neuron to the next)."""
    c, strides = geos[0].window[0], geos[0].grid[:2]
    if any(x.window[0] != c or x.grid[:2] != strides for x in geos):
        return None
    p, q = max(x.grid[2] for x in geos), max(x.grid[3] for x in geos)
    ph = p + max(x.window[1] - x.grid[2] for x in geos)
    pw = q + max(x.window[2] - x.grid[3] for x in geos)
    return Geometry((c, ph, pw), strides + (p, q))


def _placement(geo: Geometry, into: Geometry) -> tuple[int, int, int, int]:
    """Zero padding (top, bottom, left, right) that places geo's window inside into's."""
    top, left = into.grid[2] - geo.grid[2], into.grid[3] - geo.grid[3]
    return top, into.window[1] - geo.window[1] - top, left, into.window[2] - geo.window[2] - left


class _Lowering:
    def __init__(self, graph: Graph, method: str, batch: int, spec_rows: int | None, config: PlannerConfig):
        if method not in METHODS + (SPLIT_METHOD,):
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        if len(graph.outputs) != 1:
            raise UnsupportedOpError(f"model {graph.name!r} has {len(graph.outputs)} outputs; bounds need exactly one")
        self.g, self.method, self.B, self.S, self.cfg = graph, method, batch, spec_rows, config
        self.sound = config.sound_fp
        self.em = _Emitter(batch, config.fp_dtype if self.sound else "float32")
        if self.sound and config.fp_dtype != "float64":
            check_fp32(graph)
        self.producer = graph.producer()
        self.bounds: dict[str, int] = {}       # value -> its interval buffer, stack(lower, upper)
        self.relax: dict[str, int] = {}        # relaxed op's output -> its lines (ops.Relaxation)
        self.errors: dict[str, int] = {}       # sound_fp: op output -> the op's error vector (domains/fp.py)
        self.every_neuron: dict[str, int] = {}  # value -> CROWN bounds of all its neurons, [2, B, n]
        self.relaxed: set[str] = set()          # the relaxed ops' inputs

    # -- helpers ---------------------------------------------------------------------------
    def shape(self, v):
        return self.g.shape(v)

    def backward_params(self, node: Node) -> list[str | None]:
        return self.em.params(f"{node.outputs[0]}.bw", ops.get(node.op).backward_params(self.g, node))

    def interval_buffer(self, v: str, tag: str = "interval") -> int:
        """stack(lower, upper) of value v: [2, B, *shape]."""
        return self.em.buffer(f"{tag}({v})", (2, self.B) + tuple(self.shape(v)),
                              layout=self.g.values[v].type.layout)

    # -- the whole method ------------------------------------------------------------------
    def run(self) -> Lowered:
        g, em = self.g, self.em
        x = g.inputs[0]
        box = em.buffer(f"input({x})", (2, self.B) + tuple(self.shape(x)), role="input")
        em.out.inputs["box"] = box
        self.bounds[x] = box
        if self.S is not None:
            out_numel = g.values[g.outputs[0]].type.numel
            em.out.inputs["C"] = em.buffer("spec.C", (self.B, self.S, out_numel), role="input")

        relaxed = self.relaxed = set(relaxed_inputs(g))
        if self.method == SPLIT_METHOD:
            return self.run_split(relaxed)
        folded_output = self._ibp_spec_fold()
        for node in g.nodes:
            if node is folded_output:
                continue
            self.forward(node)
            v = node.outputs[0]
            if self.method in _REFINED and v in relaxed and self.needs_refining(node):
                self.refine(v)
        self.set_output("bounds", self.output_bounds(folded_output))
        if self.cfg.export_intermediate:
            for v in sorted(relaxed):
                self.set_output(Role("interm", v), self.computed(v))
        return em.out

    def run_split(self, relaxed: set[str]) -> Lowered:
        """beta-crown: the relaxations from the given intermediate bounds, then one backward
        pass for the output. A sound_fp plan first runs the interval pass (with the given
        bounds at the relaxed ops' inputs) for the ops' error vectors."""
        em = self.em
        given = {}
        for v in sorted(relaxed):
            role = Role("interm", v)
            em.out.inputs[role] = given[v] = em.buffer(
                str(role), (2, self.B) + tuple(self.shape(v)), role="input",
                layout=self.g.values[v].type.layout)
        refined = {}
        for node in self.g.nodes:
            relaxation = ops.get(node.op).relaxation
            is_relaxed = relaxation is not None
            if is_relaxed:           # (an input of the network too: then the domain's own box)
                for v in relaxation.relaxed(node):
                    if self.cfg.split_refine > 0 and v not in refined and not interval_is_exact(self.g, v):
                        refined[v] = self.refine_given(v, given[v])
                    self.bounds[v] = refined.get(v, given[v])
            if self.sound:
                self.forward(node)   # every interval and error vector, relaxations from the given bounds
            elif is_relaxed:
                self.relax_node(node)
        em.phase = "output"
        self.set_output("bounds", self.backward(self.g.outputs[0], spec=em.out.inputs.get("C"), alpha=True,
                                                lower_only=True))
        for v, bid in refined.items():
            self.set_output(Role("interm", v), bid)
        return em.out

    def refine_given(self, v: str, given: int) -> int:
        """config.split_refine: a CROWN pass for the k neurons of v each region selects (module
        input Role("refine", v), [B, k] flat indices), from the relaxations of the bounds before v
        (themselves refined), intersected with the given bounds. Both hold on the domain (the
        relaxations hold there), so does their intersection; the given bounds carry the
        domain's split constraints."""
        em, k = self.em, min(self.cfg.split_refine, self.g.values[v].type.numel)
        em.phase = f"refine({v})"
        role = Role("refine", v)
        em.out.inputs[role] = idx = em.buffer(str(role), (self.B, k), dtype="int64", role="input")
        crown = self.backward(v, onehot_index=idx, per_region=k)
        new = self.interval_buffer(v, "refined")
        em.emit("bound.merge_sparse", [given, idx, crown], [new], attrs={"intersect": True}, source=v)
        em.phase = "forward"
        return new

    def computed(self, v: str) -> int:
        """v's interval buffer, copied when it is a module input (a ReLU on the network input):
        a module output must be written by an op."""
        bid = self.bounds[v]
        if bid not in self.em.out.inputs.values():
            return bid
        copy = self.interval_buffer(v, "copy")
        self.em.emit("interval.reshape", [bid], [copy], attrs={"shape": list(self.shape(v))}, source=v)
        return copy

    def set_output(self, role: str | Role, bid: int):
        spec = self.em.out.buffers[bid]
        self.em.out.outputs[role] = bid
        self.em.out.buffers[bid] = BufferSpec(spec.id, spec.name, spec.shape, spec.dtype, spec.layout, "output")

    def _ibp_spec_fold(self) -> Node | None:
        """For IBP with C and a last linear op over a flat input, fold C into that op (not in a
        sound_fp plan: C W would need an error term of its own)."""
        if self.method != "ibp" or self.S is None or self.sound:
            return None
        node = self.producer.get(self.g.outputs[0])
        if node is None or node.op != "linear" or not _unit_lead(self.shape(node.inputs[0])):
            return None
        if len(self.g.consumers()[node.outputs[0]]) != 0:
            return None
        return node

    def relax_node(self, node: Node):
        """The lines of a relaxed op (ops.Relaxation) from its inputs' intervals, and in a
        sound_fp plan its backward rules' error vector."""
        em, op, y = self.em, ops.get(node.op), node.outputs[0]
        boxes = [self.bounds[v] for v in op.relaxation.relaxed(node)]
        rows, *shape = op.relaxation.shape(self.g, node)
        lines = em.buffer(f"{node.op}.relax({y})", (rows, self.B) + tuple(shape))
        em.emit(f"{node.op}.relax", boxes, [lines], self.backward_params(node), node.attrs, source=node.name)
        self.relax[y] = lines
        if self.sound:
            self.errors[y] = em.buffer(f"fp.error({y})", (self.B,) + tuple(self.shape(y)))
            em.emit(f"fp.{node.op}_lines", boxes + [lines], [self.errors[y]], attrs=node.attrs,
                    source=node.name)

    def forward(self, node: Node):
        em, op, y = self.em, ops.get(node.op), node.outputs[0]
        if self.sound and op.error_of_inputs and self.interval_unread(y):
            ins = [self.bounds[i] for i in node.inputs if self.g.is_variable(i)]
            self.errors[y] = em.buffer(f"fp.error({y})", (self.B,) + tuple(self.shape(y)))
            weights = em.params(f"{y}.fp", op.fp_params(self.g, node, TORCH_DTYPES[em.dtype]))
            em.emit(f"fp.{node.op}_error", ins, [self.errors[y]], weights,
                    dict(node.attrs, n=fp.dot_length(self.g, node)), source=node.name)
            return
        if op.relaxation is not None and self.method in _LINEAR:
            self.relax_node(node)
        ins = [self.bounds[i] for i in node.inputs if self.g.is_variable(i)]
        ps = em.params(f"{y}.ibp", op.interval_params(self.g, node, TORCH_DTYPES[em.dtype]))
        out = self.interval_buffer(y)
        em.emit(f"interval.{node.op}", ins, [out], ps, node.attrs, source=node.name,
                layout=node.attrs.get("layout_hint"))
        if self.sound and op.fp is not None:
            raw, out = out, self.interval_buffer(y, "sound")
            error = em.buffer(f"fp.error({y})", (self.B,) + tuple(self.shape(y)))
            weights = em.params(f"{y}.fp", op.fp_params(self.g, node, TORCH_DTYPES[em.dtype]))
            em.emit(f"fp.{node.op}", ins + [raw], [out, error], weights,
                    dict(node.attrs, n=fp.dot_length(self.g, node)), source=node.name)
            # the backward rules of a relaxed op read its lines' error vector (relax_node), not
            # the interval rule's
            self.errors.setdefault(y, error)
        self.bounds[y] = out

    def interval_unread(self, y: str) -> bool:
        """In a beta-crown plan, whether nothing reads value y's interval: each op that reads y
        is a relaxed op given y's bounds (run_split), and the output's bound is its backward
        pass (y may be the output)."""
        if self.method != SPLIT_METHOD:
            return False
        for reader in self.g.consumers()[y]:
            relaxation = ops.get(reader.op).relaxation
            if relaxation is None or y not in relaxation.relaxed(reader):
                return False
        return True

    def needs_refining(self, node: Node) -> bool:
        """Whether a relaxed op's input, node's output, gets CROWN bounds: not where interval
        bounds are exact already. At the output of a relaxed op (a ReLU before a max pool) the
        interval already comes through the relaxation of a refined input (auto_LiRPA's CROWN
        stops there); a pass of its own, over every neuron, is tighter but only affordable for
        small values (config.refine_relaxed_outputs). Ops whose interval is a view of their
        input's (reshape, transpose) are looked through: layout folding moves them across ReLUs,
        and the bounds must not depend on it."""
        v = node.outputs[0]
        if interval_is_exact(self.g, v):
            return False
        source = node
        while source is not None and f"interval.{source.op}" in ops.get(source.op).aliasing:
            source = self.producer.get(source.inputs[0])
        return source is None or ops.get(source.op).relaxation is None or \
            self.g.values[v].type.numel <= self.cfg.refine_relaxed_outputs

    def refine(self, v: str):
        """CROWN bounds for the pre-activation value v, merged into its interval bounds."""
        em, numel = self.em, self.g.values[v].type.numel
        em.phase = f"refine({v})"
        box = self.bounds[v]
        new = self.interval_buffer(v, "crown")
        mode = self.cfg.crown_interm
        # ReLU inputs skip the neurons whose interval is stable (a clamp's: that does not hold
        # its kink, Relaxation.kink); other relaxed ops refine all
        relaxed = [(n, ops.get(n.op).relaxation) for n in self.g.consumers()[v] if ops.get(n.op).relaxation]
        sparse = all(r.sparse_refine or r.kink is not None for _, r in relaxed)
        kinked = any(r.kink is not None for _, r in relaxed)
        kinks = [torch.zeros(()) if r.kink is None else r.kink(self.g, n) for n, r in relaxed] if kinked else []
        every = mode == "sparse" and self.method == "crown" and not self.sound
        node = self.producer.get(v)
        if every and node is not None and _elementwise(self.g, node) and node.inputs[0] in self.every_neuron:
            # v = f(x) coordinate by coordinate, x bounded neuron by neuron already: f's interval
            # rule maps those bounds to their exact image, at least as tight as a pass through
            # f's lines (for a ReLU the same: its upper line meets it at x's bounds)
            x = node.inputs[0]
            at_x, image = self.interval_buffer(x, "crown_all"), self.interval_buffer(v, "image")
            em.emit("interval.reshape", [self.every_neuron[x]], [at_x], attrs={"shape": list(self.shape(x))}, source=v)
            em.emit(f"interval.{node.op}", [at_x], [image], em.params(f"{v}.ibp", ops.get(node.op).interval_params(
                self.g, node, TORCH_DTYPES[em.dtype])), node.attrs, source=v)
            em.emit("bound.intersect", [box, image], [new], source=v)
        elif mode in ("sparse", "intersect") and sparse:
            fraction = self.cfg.dense_fraction if mode == "sparse" else 1.0
            idx = em.buffer(f"unstable({v})", (numel,), dtype="int64", dynamic_axis=0)
            em.emit("bound.unstable", [box], [idx], em.params(f"{v}.kink", kinks), attrs={"dense_fraction": fraction},
                    source=v)
            if every and self.feeds_refined_elementwise(v):
                # every neuron now, for the outputs of the ops reading v; the unstable ones' from it
                crown = self.every_neuron[v] = self.backward(v)
                em.emit("bound.merge_sparse", [box, idx, crown], [new], attrs={"intersect": False, "dense": True},
                        source=v)
            else:
                crown = self.backward(v, onehot_index=idx, alpha=self.method == "alpha-crown")
                em.emit("bound.merge_sparse", [box, idx, crown], [new], attrs={"intersect": mode == "intersect"},
                        source=v)
        else:
            # every neuron refined (pure CROWN, or the input of a relaxed op other than ReLU);
            # the interval still cuts what CROWN leaves loose except at a ReLU's input in "pure"
            # mode: a tangent of exp may reach below 0, where a log or 1/x after it has no lines
            crown = self.backward(v, onehot_index=None, alpha=self.method == "alpha-crown")
            if every:
                self.every_neuron[v] = crown
            em.emit("bound.replace" if mode == "pure" and sparse else "bound.intersect", [box, crown], [new],
                    source=v)
        self.bounds[v] = new
        em.phase = "forward"

    def feeds_refined_elementwise(self, v: str) -> bool:
        """Whether every op reading v maps it coordinate by coordinate (_elementwise) and its
        output gets CROWN bounds of its own (it feeds another relaxed op: a ReLU before a max
        pool): those bounds then come from a pass over every neuron of v (refine), which costs
        about what a pass from the op's output would."""
        readers = self.g.consumers()[v]
        return bool(readers) and all(_elementwise(self.g, n) and n.outputs[0] in self.relaxed and
                                     self.needs_refining(n) for n in readers)

    def output_bounds(self, folded: Node | None):
        em, out = self.em, self.g.outputs[0]
        C = em.out.inputs.get("C")
        em.phase = "output"
        if self.method != "ibp":
            return self.backward(out, spec=C, alpha=self.method in _OPTIMISED)
        rows = self.S if self.S is not None else self.g.values[out].type.numel
        res = em.buffer("output.bounds", (2, self.B, rows))
        if folded is not None:
            em.emit("interval.spec_linear", [self.bounds[folded.inputs[0]], C], [res],
                    self.backward_params(folded), source=folded.name,
                    layout=folded.attrs.get("layout_hint"))
        elif C is not None:
            em.emit("interval.spec_box", [self.bounds[out], C], [res], attrs={"fp": self.sound}, source=out)
        else:
            em.emit("interval.flatten", [self.bounds[out]], [res], source=out)
        return res

    # -- patches -----------------------------------------------------------------------------
    def patch_geometry(self, target: str) -> dict[str, Geometry] | None:
        """The window and grid of A on every value a refinement pass from ``target`` reaches
        (the union of its consumers' windows where several read it), when the pass can keep A
        as windows: every node from the target back to the network input is a 2-d conv (no
        groups, no dilation), a ReLU or a sum over [C, H, W] values (a unit leading axis
        allowed), the windows a value gets from its consumers move by the same strides, and A
        reaches every conv clean.

        Clean: zero wherever a window sticks out of its value. A conv's window reaches into its
        input's padding; a ReLU's lines (as the box at the end) are read as zeros there, which
        cleans A, and a sum passes A on as it is. A conv needs it clean (it would move those
        coefficients inside). Else None."""
        g = self.g
        node0 = self.producer.get(target)
        if node0 is None or not _patchable(g, node0):
            return None
        start = _patch_start_geometry(g, node0)
        first = node0.inputs[0] if node0.op == "conv2d" else target
        reached, dirty = {first: [start]}, {first: node0.op == "conv2d"}
        geometry: dict[str, Geometry] = {}
        ancestors = _ancestors(g, target)
        for node in reversed(g.nodes):
            out = node.outputs[0]
            if out not in ancestors or out not in reached or (node is node0 and node.op == "conv2d"):
                continue
            if not _patchable(g, node) or (node.op == "conv2d" and dirty[out]):
                return None
            geometry[out] = _union(reached[out])
            if geometry[out] is None:
                return None
            through = _through(g, node, geometry[out])
            for i in (i for i in node.inputs if g.is_variable(i)):
                reached.setdefault(i, []).append(through)
                dirty[i] = dirty.get(i, False) or node.op == "conv2d" or (node.op == "add" and dirty[out])
        x = g.inputs[0]
        if x not in reached:
            return None
        geometry[x] = _union(reached[x])
        if geometry[x] is None:
            return None
        return geometry

    def patch_backward(self, target: str, geometry: dict[str, Geometry], idx: int | None, alpha: bool) -> int:
        """The refinement pass of the neurons ``idx`` (all when None) of ``target`` over
        patches (domains/patches.py): A on each value as one window per row, placed as
        ``geometry`` says; the same bounds as the dense pass, at the cost of the windows."""
        g, em, B = self.g, self.em, self.B
        rows2 = 2 * g.values[target].type.numel
        dynamic = None if idx is None else 1
        sel = [] if idx is None else [idx]
        base = {"target": list(tuple(self.shape(target))[-3:]), **({"fp": True} if self.sound else {})}

        def a_buf(v, window):
            return em.buffer(f"A({target}->{v})", (B, rows2) + tuple(window), dynamic_axis=dynamic)

        def bias_buf():
            return em.buffer(f"bias({target})", (B, rows2), dynamic_axis=dynamic)

        def err(node):          # sound_fp: the op's error vector, read at each row's window
            return [self.errors[node.outputs[0]]] if self.sound else []

        A: dict[str, tuple[int, Geometry]] = {}     # value -> (its A, the windows it has)

        def placed(v: str, buf: int, geo: Geometry) -> int:
            """buf on v's windows (zeros around it)."""
            want = geometry[v]
            if geo == want:
                return buf
            out = a_buf(v, want.window)
            em.emit("linear.patch_pad", [buf], [out], attrs={"pad": list(_placement(geo, want))}, source=target)
            return out

        def give(v: str, buf: int, geo: Geometry):
            """A contribution on v; a second one is summed with it on v's windows, placed there
            by the sum (patch_add: no padded copy). A sound_fp plan's sums widen the bias by
            their rounding (patch_add, padded or not)."""
            nonlocal bias
            if v not in A:
                A[v] = buf, geo
                return
            (first, first_geo), want = A[v], geometry[v]
            if first_geo != want and geo == want:                # (the sum commutes)
                (first, first_geo), (buf, geo) = (buf, geo), (first, first_geo)
            first, acc = placed(v, first, first_geo), a_buf(v, want.window)
            pad = {"pad": list(_placement(geo, want))}
            if self.sound:
                new_bias = bias_buf()
                em.emit("linear.patch_add", [first, buf, bias, self.bounds[v]] + sel, [acc, new_bias],
                        attrs={**base, **pad, "grid": list(want.grid)}, source=target)
                bias = new_bias
            elif geo == want:
                em.emit("linear.accumulate", [first, buf], [acc], source=target)
            else:
                em.emit("linear.patch_add", [first, buf], [acc], attrs=pad, source=target)
            A[v] = acc, want

        node0 = self.producer[target]
        start = _patch_start_geometry(g, node0)
        bias = bias_buf()
        if node0.op == "conv2d":
            a = a_buf(node0.inputs[0], start.window)
            em.emit("linear.patch_start", sel + err(node0), [a, bias], self.backward_params(node0),
                    {"batch": B, **base}, source=target)
            give(node0.inputs[0], a, start)
        else:
            a = a_buf(target, start.window)
            em.emit("linear.patch_start_onehot", sel, [a, bias],
                    attrs={"batch": B, "dtype": em.dtype, "device": self.cfg.device, **base}, source=target)
            give(target, a, start)
        for node in reversed(g.nodes):
            out = node.outputs[0]
            if out not in A or (node is node0 and node.op == "conv2d"):
                continue
            geo = geometry[out]
            a_out = placed(out, *A[out])
            through = _through(g, node, geo)
            var = [i for i in node.inputs if g.is_variable(i)]
            if node.op == "add":
                for i in var:
                    give(i, a_out, through)
                continue
            new_a, new_bias = a_buf(var[0], through.window), bias_buf()
            grid = {**base, "grid": list(geo.grid)}
            if node.op != "conv2d" and ops.get(node.op).relaxation is not None:
                ins = [a_out, bias, self.relax[out]]
                if alpha:                     # one slope per row and window position, as A
                    role = Role("alpha", out, target)
                    em.out.inputs[role] = em.buffer(str(role), (B, rows2) + tuple(geo.window),
                                                    role="input", dynamic_axis=dynamic)
                    ins.append(em.out.inputs[role])
                kernel = _patch_rule(node) + ("_alpha" if alpha else "")
                em.emit(kernel, ins + sel + err(node), [new_a, new_bias], attrs=grid, source=target)
            elif node.op != "conv2d":         # constants at each row's window (an affine map)
                em.emit(_patch_rule(node), [a_out, bias] + sel + err(node), [new_a, new_bias],
                        self.backward_params(node), {**grid, "shape": list(self.shape(out))}, source=target)
            else:
                em.emit("linear.patch_conv", [a_out, bias] + (err(node) + sel if self.sound else []),
                        [new_a, new_bias], self.backward_params(node),
                        {"stride": list(node.attrs["stride"]), **(grid if self.sound else {})}, source=target)
            bias = new_bias
            give(var[0], new_a, through)
        x = g.inputs[0]
        res = em.buffer(f"crown({target})", (2, B, rows2 // 2), dynamic_axis=None if idx is None else 2)
        em.emit("linear.patch_concretize", [placed(x, *A[x]), bias, self.bounds[x]] + sel, [res],
                attrs={**base, "grid": list(geometry[x].grid)}, source=target)
        return res

    # -- one CROWN backward pass -------------------------------------------------------------
    def backward(self, target: str, spec: int | None = None, onehot_index: int | None = None,
                 alpha: bool = False, lower_only: bool = False, per_region: int | None = None):
        """Emit a backward pass bounding `target`: the rows of C (or every output) for the graph
        output, else the neurons `onehot_index` selects (all when None): [k] for every region,
        k known at run time, or with ``per_region`` [B, per_region], each region's own (a dense
        pass: patches select one set for the batch). Returns the buffer of stack(lower, upper),
        [2, B, S] (upper +inf when lower_only)."""
        g, em, B = self.g, self.em, self.B
        if target != g.outputs[0] and self.cfg.patches and per_region is None:
            geometry = self.patch_geometry(target)
            if geometry is not None:
                return self.patch_backward(target, geometry, onehot_index, alpha)
        is_output = target == g.outputs[0]
        numel = g.values[target].type.numel
        rows2 = (1 if lower_only else 2) * (self.S if spec is not None else per_region or numel)
        sides = {"lower_only": True} if lower_only else {}
        # the unstable count is known at run time
        dynamic = 1 if onehot_index is not None and per_region is None else None
        idx_in = [onehot_index] if onehot_index is not None else []

        def a_buf(v):
            return em.buffer(f"A({target}->{v})", (B, rows2) + tuple(self.shape(v)), dynamic_axis=dynamic)

        def bias_buf():
            return em.buffer(f"bias({target})", (B, rows2), dynamic_axis=dynamic)

        A: dict[str, int] = {}
        node0 = self.producer.get(target)      # None: the output is the input (an identity model)
        op0 = None if node0 is None else ops.get(node0.op)
        skip = None
        rows = None
        if not is_output and op0 is not None and op0.matrix is not None:
            matrix = op0.matrix(g, node0, TORCH_DTYPES[em.dtype], self.cfg.dense_conv_start_bytes)
            rows = None if matrix is None else em.params(f"{target}.rows", matrix)
        fp_attrs = {"fp": True} if self.sound else {}
        if rows is not None:
            # fused start: the selected rows of the op's matrix are the coefficients on its input
            x_in = node0.inputs[0]
            a, bias = a_buf(x_in), bias_buf()
            errs = [self.errors[target]] if self.sound else []
            em.emit("linear.start_rows", idx_in + errs, [a, bias], rows,
                    {"batch": B, "in_shape": list(self.shape(x_in)), **fp_attrs}, source=target)
            A[x_in], skip = a, node0
        else:
            a, bias = a_buf(target), bias_buf()
            attrs = {"batch": B, "shape": list(self.shape(target)), "numel": numel, "dtype": em.dtype,
                     "device": self.cfg.device, **sides}
            if is_output:
                em.emit("linear.start_spec", [spec] if spec is not None else [], [a, bias], attrs=attrs, source=target)
            else:
                em.emit("linear.start_onehot", idx_in, [a, bias], attrs=attrs, source=target)
            A[target] = a

        def give(v, buf):
            nonlocal bias
            if v not in A:
                A[v] = buf
                return
            # fan-out: contributions of every consumer add up (a sound plan also widens the bias)
            acc = a_buf(v)
            if self.sound:
                new_bias = bias_buf()
                em.emit("linear.accumulate", [A[v], buf, bias, self.bounds[v]], [acc, new_bias],
                        attrs={**fp_attrs, **sides}, source=target)
                bias = new_bias
            else:
                em.emit("linear.accumulate", [A[v], buf], [acc], source=target)
            A[v] = acc

        ancestors = _ancestors(g, target)
        for node in reversed(g.nodes):     # reverse topological: all consumers of v come first
            out = node.outputs[0]
            if node is skip or out not in ancestors or out not in A:
                continue
            var = [i for i in node.inputs if g.is_variable(i)]
            op = ops.get(node.op)
            if node.op == "reshape" and var == [g.inputs[0]] and len(g.consumers()[var[0]]) == 1:
                # concretize reads A flat, in the same order: a reshape onto the input would copy it
                A[var[0]] = A[out]
                continue
            if op.backward is None:            # a sum: every input gets the same A
                for i in var:
                    give(i, A[out])
                continue
            new_as = [a_buf(i) for i in var]
            new_bias = bias_buf()
            ins = [A[out], bias]
            attrs = dict(node.attrs, in_shape=list(self.shape(var[0])), **op.backward_attrs(g, node))
            kernel = f"linear.{node.op}"
            if op.relaxation is not None:
                attrs.update(sides)
                ins.append(self.relax[out])
                if alpha:
                    relaxation = op.relaxation
                    split = self.method == SPLIT_METHOD and relaxation.splits_at_zero
                    for kind in ("alpha", "beta") if split else ("alpha",):
                        # alpha: the relaxation's parameters per row and neuron of its lines
                        # (per op); beta: a split multiplier per row and input neuron (per
                        # input: two ReLUs of one value share its splits)
                        role = Role(kind, out if kind == "alpha" else node.inputs[0], target)
                        lead = relaxation.param_lead(g, node) if kind == "alpha" else ()
                        shape = relaxation.shape(g, node)[1:] if kind == "alpha" else self.shape(node.inputs[0])
                        if role not in em.out.inputs:     # the region axis first (optimisers batch on it)
                            em.out.inputs[role] = em.buffer(
                                str(role), (B,) + lead + (rows2,) + tuple(shape), role="input",
                                dynamic_axis=None if dynamic is None else dynamic + len(lead))
                        ins.append(em.out.inputs[role])
                    kernel = f"linear.{node.op}_alpha"
            if out in self.errors:             # sound_fp: the op's error vector widens the bias
                ins.append(self.errors[out])
                attrs.update(fp_attrs, **sides)
            params = self.backward_params(node)
            if node.op == "conv2d" and not self.sound:      # a small conv: its dense matrix too (made once)
                name = f"{out}.bw_dense"
                if name not in em.out.params:
                    dense = op.matrix(g, node, TORCH_DTYPES[em.dtype], self.cfg.dense_conv_backward_bytes)
                    em.param(name, None if dense is None else dense[0])
                params += [name] if name in em.out.params else []
            em.emit(kernel, ins, [*new_as, new_bias], params, attrs, source=target,
                    layout=node.attrs.get("layout_hint"))
            bias = new_bias
            for i, buf in zip(var, new_as):
                give(i, buf)

        res = em.buffer(f"crown({target})", (2, B, rows2 // (1 if lower_only else 2)),
                        dynamic_axis=None if dynamic is None else 2)
        x = g.inputs[0]
        if x in A:
            em.emit("linear.concretize", [A[x], bias, self.bounds[x]], [res], attrs={**sides, **fp_attrs},
                    source=target)
        else:
            em.emit("linear.concretize_const", [bias], [res], attrs=sides, source=target)
        return res


def lower(graph: Graph, method: str, batch: int, spec_rows: int | None, config: PlannerConfig) -> Lowered:
    if batch < 1:
        raise ShapeError(f"batch must be >= 1, got {batch}")
    return _Lowering(graph, method, batch, spec_rows, config).run()
