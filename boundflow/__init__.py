"""BoundFlow: a verification-aware compiler and runtime for neural-network bound propagation."""
from boundflow.api import BoundedModel, BoundsResult, bound, compute_bounds, load_model
from boundflow.errors import BoundflowError, ModelLoadError, ShapeError, SpecError, UnsupportedOpError
from boundflow.ir.task import BFTaskModule, BoundTask, BufferSpec, MemoryPlan, TaskOp
from boundflow.planner.config import PlannerConfig
from boundflow.planner.pipeline import plan
from boundflow.runtime.python_executor import PythonTaskExecutor
from boundflow.runtime.tvm_executor import MemoryPlanMode, TVMExecutorOptions, TVMTaskExecutor

__all__ = [
    "compute_bounds", "bound", "BoundsResult", "BoundedModel", "load_model", "plan", "PlannerConfig",
    "BFTaskModule", "BoundTask", "TaskOp", "BufferSpec", "MemoryPlan", "PythonTaskExecutor",
    "TVMTaskExecutor", "TVMExecutorOptions", "MemoryPlanMode",
    "BoundflowError", "ModelLoadError", "ShapeError", "SpecError", "UnsupportedOpError",
]
__version__ = "0.1.0"
