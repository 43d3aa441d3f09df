"""mobiquant: elastic mixture-of-bits quantization (MoBiQuant) for LLMs.

One calibrated checkpoint stores every weight as a low-bit base slice plus residual slices; a tiny
per-token router picks how many slices each token uses, so the average bit-width is chosen at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public names and their modules, imported on first use: `mobiquant --help` and configuration errors
# answer without loading torch and Lightning.
_EXPORTS = {
    "CalibConfig": "calibration",
    "calibrate": "calibration",
    "CheckpointError": "io.checkpoint",
    "load_quantized": "io.checkpoint",
    "save_quantized": "io.checkpoint",
    "MoBiLinear": "nn.linear",
    "MoBiConfig": "quant.config",
    "achieved_bits": "patching",
    "calibrate_thresholds": "patching",
    "freeze": "patching",
    "quantize_model": "patching",
    "reset_counts": "patching",
    "set_budget": "patching",
    "install_plan": "patching",
    "plan_budgets": "elastic.site_budgets",
    "set_static": "patching",
    "storage_bits": "patching",
    "ResidualSlicer": "quant.slicer",
    "TokenRouter": "nn.router",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the same names for type checkers, re-exported explicitly (`name as name`)
    from .calibration import CalibConfig as CalibConfig
    from .calibration import calibrate as calibrate
    from .elastic.site_budgets import plan_budgets as plan_budgets
    from .io.checkpoint import CheckpointError as CheckpointError
    from .io.checkpoint import load_quantized as load_quantized
    from .io.checkpoint import save_quantized as save_quantized
    from .nn.linear import MoBiLinear as MoBiLinear
    from .nn.router import TokenRouter as TokenRouter
    from .patching import achieved_bits as achieved_bits
    from .patching import calibrate_thresholds as calibrate_thresholds
    from .patching import freeze as freeze
    from .patching import install_plan as install_plan
    from .patching import quantize_model as quantize_model
    from .patching import reset_counts as reset_counts
    from .patching import set_budget as set_budget
    from .patching import set_static as set_static
    from .patching import storage_bits as storage_bits
    from .quant.config import MoBiConfig as MoBiConfig
    from .quant.slicer import ResidualSlicer as ResidualSlicer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule: mq.patching, mq.report, ...
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
