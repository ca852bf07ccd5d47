"""Primal operators, one module per op family, each op defined once (see registry.py).

Importing this package registers every op and every frontend mapping (ONNX_LOWERINGS,
TORCH_LOWERINGS). KERNELS maps a TaskOp's kernel name to its function: the ops' own kernels and
the shared machinery of the domains (starting and ending backward passes, output intervals,
bookkeeping). ALIASING_KERNELS lists the kernels whose results may be views of their inputs
(VIEW_KERNELS: those whose results are their inputs reshaped, given their inputs' bytes);
every other kernel returns fresh tensors, so its outputs may take the bytes of inputs that die
at that op, except those in WRITING_KERNELS (marked `boundflow.domains.writes_into`), which
write their results into the planned views while they still read their inputs.
"""
import importlib
import pkgutil

from boundflow.domains import bound as _bound
from boundflow.domains import interval as _interval
from boundflow.domains import linear as _linear
from boundflow.domains import patches as _patches
from boundflow.ops.registry import (ONNX_LOWERINGS, ONNX_REWRITES, OPS, TORCH_LOWERINGS, Op, Relaxation, get, onnx_lowering,
                                     onnx_rewrite, register, torch_lowering)

for _module in pkgutil.iter_modules(__path__):       # an op module registers its ops on import
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

KERNELS = {f"{domain}.{name}": fn
           for domain, table in (("interval", _interval.RULES), ("linear", _linear.RULES),
                                 ("linear", _patches.RULES), ("bound", _bound.RULES))
           for name, fn in table.items()}
for _op in OPS.values():
    KERNELS.update(_op.all_kernels())

ALIASING_KERNELS = frozenset({"bound.replace"} | _interval.ALIASING).union(*(op.aliasing for op in OPS.values()))
VIEW_KERNELS = _interval.VIEWS.union(*(op.views for op in OPS.values()))
assert VIEW_KERNELS <= ALIASING_KERNELS
WRITING_KERNELS = frozenset(name for name, fn in KERNELS.items() if getattr(fn, "writes_into", False))

__all__ = ["OPS", "Op", "Relaxation", "get", "register", "KERNELS", "ALIASING_KERNELS", "VIEW_KERNELS", "WRITING_KERNELS",
           "ONNX_LOWERINGS", "ONNX_REWRITES", "TORCH_LOWERINGS", "onnx_lowering", "onnx_rewrite", "torch_lowering"]
