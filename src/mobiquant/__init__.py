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
    "CheckpointError": "checkpoint",
    "load_quantized": "checkpoint",
    "save_quantized": "checkpoint",
    "MoBiLinear": "modules",
    "MoBiConfig": "patching",
    "achieved_bits": "patching",
    "calibrate_thresholds": "patching",
    "freeze": "patching",
    "quantize_model": "patching",
    "reset_counts": "patching",
    "set_budget": "patching",
    "install_plan": "patching",
    "plan_budgets": "site_budgets",
    "set_static": "patching",
    "storage_bits": "patching",
    "ResidualSlicer": "quant.slicer",
    "TokenRouter": "router",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .calibration import CalibConfig, calibrate
    from .checkpoint import CheckpointError, load_quantized, save_quantized
    from .modules import MoBiLinear
    from .patching import (
        MoBiConfig,
        achieved_bits,
        calibrate_thresholds,
        freeze,
        install_plan,
        quantize_model,
        reset_counts,
        set_budget,
        set_static,
        storage_bits,
    )
    from .quant.slicer import ResidualSlicer
    from .router import TokenRouter
    from .site_budgets import plan_budgets


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
