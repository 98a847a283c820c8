"""qsdonnx: quantized, sparse, low-rank compression of ONNX model weights."""
from .api import OptimizeResult, inspect, optimize, validate
from .config import LayerOverride, OptimizeConfig
from .errors import ConfigError, InputError, OutputError, QsdError, ValidationFailed

__version__ = "0.1.0"
__all__ = [
    "optimize", "inspect", "validate", "OptimizeResult", "OptimizeConfig", "LayerOverride",
    "QsdError", "InputError", "ConfigError", "OutputError", "ValidationFailed",
]
