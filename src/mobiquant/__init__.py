"""mobiquant: elastic mixture-of-bits quantization (MoBiQuant) for LLMs.

One calibrated checkpoint stores every weight as a low-bit base slice plus residual slices; a tiny
per-token router picks how many slices each token uses, so the average bit-width is chosen at run time.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
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
    "export_hf": "hf",
    "save_pretrained": "hf",
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
    from .hf import export_hf as export_hf
    from .hf import save_pretrained as save_pretrained
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


# ---------------------------------------------------------------------------- Hugging Face registration
# `AutoModelForCausalLM.from_pretrained` loads mobiquant folders once the "mobiquant" quantizer is registered
# with transformers (mobiquant.hf). Importing transformers' quantizers takes seconds, so it is not done here:
# the registration runs when transformers imports them (or now, if it already has).
_HF_TRIGGER = "transformers.quantizers.auto"


def _register_hf() -> None:
    if "mobiquant.hf" in sys.modules:  # registered, or registering at the end of its own import
        return
    try:
        importlib.import_module(".hf", __name__)
    except Exception as e:  # noqa: BLE001 - never break the import of transformers
        warnings.warn(f"mobiquant: Hugging Face quantizer not registered: {e}", RuntimeWarning, stacklevel=2)


class _Loader(importlib.abc.Loader):
    """The loader of transformers' quantizer registry, followed by mobiquant's registration."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _register_hf()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _HF_TRIGGER:
            return None
        sys.meta_path.remove(self)  # once; and find_spec below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if _HF_TRIGGER in sys.modules:
    _register_hf()
elif not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
