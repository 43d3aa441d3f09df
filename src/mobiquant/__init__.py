"""mobiquant: elastic mixture-of-bits quantization (MoBiQuant) for LLMs.

One calibrated checkpoint stores every weight as a low-bit base slice plus residual slices; a tiny
per-token router picks how many slices each token uses, so the average bit-width is chosen at run time.
"""

from .calibration import CalibConfig, calibrate
from .checkpoint import CheckpointError, load_quantized, save_quantized
from .modules import MoBiLinear
from .patching import (
    MoBiConfig,
    achieved_bits,
    calibrate_thresholds,
    freeze,
    quantize_model,
    reset_counts,
    set_budget,
    set_static,
    storage_bits,
)
from .quant.slicer import ResidualSlicer
from .router import TokenRouter

__version__ = "0.1.0"

__all__ = [
    "CalibConfig",
    "CheckpointError",
    "MoBiConfig",
    "MoBiLinear",
    "ResidualSlicer",
    "TokenRouter",
    "achieved_bits",
    "calibrate",
    "calibrate_thresholds",
    "freeze",
    "load_quantized",
    "quantize_model",
    "reset_counts",
    "save_quantized",
    "set_budget",
    "set_static",
    "storage_bits",
]
