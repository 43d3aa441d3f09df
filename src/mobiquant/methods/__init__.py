"""Quantization methods behind ``quant=``: the interface and MoBiQuant (:mod:`.core`); the baselines.

The method classes are re-exported here, so Hydra ``_target_: mobiquant.methods.MoBiQuant`` names them.
"""

from .core import (
    GPTQ,
    HQQ,
    LWC,
    RTN,
    FullPrecision,
    Matryoshka,
    MixedLayer,
    MoBiQuant,
    QuantMethod,
    RunContext,
    SiteBudgets,
    Variant,
    build_method,
)

__all__ = [
    "GPTQ",
    "HQQ",
    "LWC",
    "RTN",
    "FullPrecision",
    "Matryoshka",
    "MixedLayer",
    "MoBiQuant",
    "QuantMethod",
    "RunContext",
    "SiteBudgets",
    "Variant",
    "build_method",
]
