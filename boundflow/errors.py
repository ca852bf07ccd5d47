"""Errors BoundFlow raises on purpose. Each message names the file, node or line at fault."""


class BoundflowError(Exception):
    """Base class: something the user handed us cannot be processed as asked."""


class ModelLoadError(BoundflowError):
    """A model file is missing, truncated or malformed."""


class UnsupportedOpError(BoundflowError):
    """A model uses an op (or an op configuration) BoundFlow has no sound rules for."""


class ShapeError(BoundflowError):
    """An input region, spec matrix or tensor has the wrong shape or is inconsistent."""


class SpecError(BoundflowError):
    """A property / VNNLIB / spec file is malformed."""


class DomainError(BoundflowError):
    """Bounds on an op's input leave the op's domain (log of an interval reaching 0, a reciprocal
    across 0), or its output overflows: no finite sound bound exists."""


class DeviceError(BoundflowError):
    """The requested device is unknown or not available here (e.g. "cuda" without CUDA)."""
