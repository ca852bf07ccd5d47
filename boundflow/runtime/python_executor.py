"""PythonTaskExecutor: runs a BFTaskModule task by task with torch kernels.

It allocates the arenas the memory plan describes, once per module, and every op's outputs are
written into their planned views: by the kernel itself (WRITING_KERNELS, given the views as
`out`), else copied there from its result. Buffers with a dynamic axis get a view of the size
the data has, at the start of their planned slot. An op whose buffers are all static is bound
to their views once per plan (`_bind`): a run calls it with nothing left to look up.
"""
from __future__ import annotations

import functools
import operator
import weakref
from dataclasses import dataclass

import torch

from boundflow.ops import ALIASING_KERNELS, KERNELS, WRITING_KERNELS
from boundflow.ir.task import TORCH_DTYPES, BFTaskModule
from boundflow.runtime.arena import allocate, bind_inputs, input_views
from boundflow.runtime.device import NO_CONTEXT, ieee_float32
from boundflow.runtime.heap import keep_freed_memory

_InferenceMode = torch._C._InferenceMode


@dataclass
class _Prepared:
    arenas: dict[str, torch.Tensor]
    views: list[torch.Tensor | None]          # static views, by buffer id; None for dynamic ones
    slots: list[tuple[torch.Tensor, int]]     # (arena, element offset), by buffer id
    # role -> an input's view: a caller may write the input there itself and pass the view
    # (bind_inputs then copies nothing)
    inputs: dict
    outputs: list[tuple]                       # (role, its view) per output (None if dynamic)
    # (the op bound to its buffers when every one is static (a function of nothing, see
    #  `_bind`), kernel, input ids, output ids, params, attrs, name, whether an output has a
    #  dynamic size, the outputs' views when it writes into them, the inputs' views when all
    #  are static)
    program: list[tuple]
    # when every op is bound (all buffers static): (run, its outputs' views) per op that has
    # something to do, the whole run as one short loop (a small net's run is mostly the
    # executor's own Python)
    bound: list[tuple] | None = None
    cuda: bool = False                         # (decided once: torch.device.type is a new str per call)


class PythonTaskExecutor:
    """The reference executor, and the fast default on CPU; runs a plan on its device (CPU,
    CUDA), where it allocates the arenas and every kernel computes."""

    name = "python"

    def __init__(self, checked: bool = False):
        # checked: fail if a kernel breaks a promise the plan relies on: a result that is a view
        # of an input (unless the kernel is listed as aliasing; the storage plan relies on it),
        # or of another dtype than its buffer (copying it in would hide a lost precision, e.g.
        # float32 arithmetic in a float64 sound_fp plan); a debugging and testing aid
        self.checked = checked
        # prepared state (arenas, views) lives as long as its module and no longer
        self._prepared: weakref.WeakKeyDictionary[BFTaskModule, _Prepared] = weakref.WeakKeyDictionary()
        self.stats = {"runs": 0, "prepares": 0, "arena_bytes": 0}

    def prepare(self, module: BFTaskModule) -> _Prepared:
        hit = self._prepared.get(module)
        if hit is not None:
            return hit
        keep_freed_memory()              # kernels' temporaries from the heap, not fresh mmaps
        arenas, views, slots = allocate(module)
        program = []
        for op in module.ops():
            kernel = KERNELS.get(op.op)
            if kernel is None:
                raise NotImplementedError(f"PythonTaskExecutor has no kernel for {op.op!r} ({op.source})")
            into = tuple(views[b] for b in op.outputs) if op.op in WRITING_KERNELS else None
            # (a static buffer's env entry is its view; a tuple: every run shares it)
            static = tuple(views[b] for b in op.inputs)
            static = None if any(v is None for v in static) else static
            params = [module.params[p] if p else None for p in op.params]
            dynamic = any(views[b] is None for b in op.outputs)
            run = None if static is None or dynamic else _bind(kernel, static, params, op.attrs, into)
            program.append((run, kernel, op.inputs, op.outputs, params, op.attrs, op.op, dynamic, into, static))
        # (a view kernel whose results the storage plan put at its inputs' bytes has nothing to do)
        aliases = module.memory_plan.aliases
        bound = None if any(step[0] is None for step in program) else [
            (run, tuple(views[b] for b in outs)) for run, _, _, outs, *_ in program
            if not all(b in aliases for b in outs)]
        outputs = [(role, views[bid]) for role, bid in module.outputs.items()]
        prepared = _Prepared(arenas, views, slots, input_views(module, views), outputs, program, bound,
                             module.device.type == "cuda")
        self._prepared[module] = prepared
        self.stats["prepares"] += 1
        self.stats["arena_bytes"] = sum(a.numel() * a.element_size() for a in arenas.values())
        return prepared

    def run(self, module: BFTaskModule, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module's outputs (on its device) for `inputs` (copied into the arena)."""
        p = self.prepare(module)
        checked = self.checked
        # inference mode: ~20% less dispatch per torch op than no_grad (no version counters or
        # autograd keys), most of a small net's time; the arena (made in prepare, outside it)
        # stays an ordinary tensor, and so do the clones handed out below (made outside it).
        # Its C guard: torch.inference_mode() is ~2 us of Python per run (6% of mlp_small's IBP)
        fp32 = ieee_float32(module.device) if p.cuda else NO_CONTEXT
        if p.bound is not None and not checked:
            with _InferenceMode(True), fp32:
                bind_inputs(module, p.views, inputs)
                for run, views in p.bound:
                    for t, view in zip(run(), views):
                        if t is not view:                  # (a writing kernel's result is its view)
                            view.copy_(t)
            return self._outputs(p.outputs)
        env: list[torch.Tensor | None] = list(p.views)
        views, slots = p.views, p.slots
        with _InferenceMode(True), fp32:
            bind_inputs(module, env, inputs)
            for run, kernel, ins, outs, params, attrs, name, dynamic, into, static in p.program:
                if run is not None:                        # (every buffer static: bound at prepare)
                    results = run()
                    if into is not None and not checked and all(map(operator.is_, results, into)):
                        continue                           # written in place: nothing to copy
                    args = static
                elif into is None:
                    args = static or [env[i] for i in ins]
                    results = kernel(args, params, attrs)
                elif not dynamic:
                    args = [env[i] for i in ins]
                    results = kernel(args, params, attrs, out=into)
                    if not checked and all(map(operator.is_, results, into)):
                        continue                           # written in place: nothing to copy
                else:   # a dynamic buffer's view is empty, at its slot: out= grows it to the data's size
                    args = static or [env[i] for i in ins]
                    results = kernel(args, params, attrs,
                                     out=[v if v is not None else _empty_at(*slots[b]) for b, v in zip(outs, into)])
                if checked:
                    _check_promises(name, args, results, [module.buffers[b] for b in outs],
                                    [views[b] if views[b] is not None else slots[b] for b in outs], module.device)
                for bid, t in zip(outs, results):
                    view = views[bid]
                    if view is None:                       # dynamic: a view of the data's size
                        arena, start = slots[bid]
                        if into is not None and _at(t, arena, start):
                            _check_fits(t, module.buffers[bid])
                            env[bid] = t
                            continue
                        view = arena.narrow(0, start, t.numel()).view(t.shape)
                        env[bid] = view
                    if t is not view:                      # (a writing kernel's result is its view)
                        view.copy_(t)
        return self._outputs([(role, env[bid]) for role, bid in module.outputs.items()])

    def _outputs(self, views: list) -> dict[str, torch.Tensor]:
        """The module's outputs, cloned out of the arena (the next run reuses it)."""
        self.stats["runs"] += 1
        return {role: view.clone() for role, view in views}

    def run_functional(self, module: BFTaskModule, inputs: dict[str, torch.Tensor],
                       env: dict[int, torch.Tensor] | None = None, ops=None) -> dict[int, torch.Tensor]:
        """Run `ops` (default: all) on plain tensors, without the arena, so autograd can see
        through them (alpha-CROWN). `env` holds buffers computed earlier; `inputs` must be on
        the module's device already. Returns buffer -> tensor."""
        env = dict(env or {})
        for role, bid in module.inputs.items():
            if role in inputs:
                env[bid] = inputs[role]
        with ieee_float32(module.device):
            for op in module.ops() if ops is None else ops:
                params = [module.params[p] if p else None for p in op.params]
                env.update(zip(op.outputs, KERNELS[op.op]([env[i] for i in op.inputs], params, op.attrs)))
        return env


def _bind(kernel, inputs: tuple, params: list, attrs: dict, into: tuple | None):
    """The op as a function of nothing over its static views, made once per plan: a kernel's
    own `bind` (`boundflow.domains.binds`: the views it slices and the branch it takes are
    found once, not per run), else the kernel with its arguments given."""
    bind = getattr(kernel, "bind", None)
    if into is None:
        return functools.partial(kernel, inputs, params, attrs) if bind is None else bind(inputs, params, attrs)
    return functools.partial(kernel, inputs, params, attrs, out=into) if bind is None else bind(inputs, params, attrs, into)


def _empty_at(arena: torch.Tensor, start: int) -> torch.Tensor:
    return arena.narrow(0, start, 0)


def _at(t: torch.Tensor, arena: torch.Tensor, start: int) -> bool:
    """Whether t was written in place at element `start` of the arena (a grown empty view)."""
    return t.is_contiguous() and t.data_ptr() == arena.data_ptr() + start * arena.element_size()


def _check_fits(t: torch.Tensor, spec) -> None:
    if t.numel() > spec.numel:
        raise RuntimeError(f"buffer {spec.id} ({spec.name}) got {t.numel()} elements, more than the "
                           f"{spec.numel} its plan holds")


def _check_promises(name: str, inputs: list[torch.Tensor], results, specs, places, device: torch.device) -> None:
    """places: each result's planned view, or (arena, start) for a buffer of dynamic size."""
    # (storage without bytes, e.g. on the meta device, has address 0 and aliases nothing)
    held = {t.untyped_storage().data_ptr() for t in inputs if t is not None} - {0}
    for k, (t, spec, place) in enumerate(zip(results, specs, places)):
        if t.device.type != device.type or device.index not in (None, t.device.index):   # "cuda" is any cuda:N
            raise AssertionError(f"kernel {name} returned a tensor on {t.device} as result {k}; the plan runs on {device}")
        if t is place or (isinstance(place, tuple) and name in WRITING_KERNELS and _at(t, *place)):
            # written into its planned bytes (the arena, which inputs share)
            if name not in WRITING_KERNELS:
                raise AssertionError(f"kernel {name} returned its planned view as result {k} without being "
                                     "marked writes_into")
        elif t.numel() and name not in ALIASING_KERNELS and t.untyped_storage().data_ptr() in held:
            raise AssertionError(f"kernel {name} returned a view of an input as result {k}; "
                                 "add it to ALIASING_KERNELS or return a fresh tensor")
        if t.dtype != TORCH_DTYPES[spec.dtype]:
            raise AssertionError(f"kernel {name} returned {t.dtype} as result {k} for the {spec.dtype} "
                                 f"buffer {spec.id} ({spec.name})")
