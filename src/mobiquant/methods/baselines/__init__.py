"""Baselines measured side by side with MoBiQuant (docs/DESIGN.md, section 'Baselines').

Every baseline whose weights fit the MoBiSlice format returns a model of packed ``MoBiLinear``s, so
evaluation, bit accounting, checkpoints and kernels are shared:

* :func:`quantize_gptq`        GPTQ at any bit-width 1-8 (one slice of ``bits`` bits)
* :func:`quantize_matryoshka`  one 8-bit RTN code, read at 2/4/6/8 bits by MSB truncation (no router)
* :mod:`.mixed_layer`          static per-layer ``k`` for fractional budgets on a multi-slice model
* :func:`quantize_hqq`         the external ``hqq`` package (imported lazily)
"""

from .common import mark_quantized, pack_linear_from_codes
from .gptq import GPTQResult, HessianAccumulator, gptq_quantize_weight, quantize_gptq
from .hqq_baseline import HQQ_BITS, hqq_available, hqq_storage_bits, quantize_hqq
from .matryoshka import matryoshka_codes, quantize_matryoshka, truncated_view
from .mixed_layer import (
    allocate_bits,
    allocation_bits,
    allocation_table,
    apply_allocation,
    layer_sensitivity,
)

__all__ = [
    "GPTQResult",
    "HQQ_BITS",
    "HessianAccumulator",
    "allocate_bits",
    "allocation_bits",
    "allocation_table",
    "apply_allocation",
    "gptq_quantize_weight",
    "hqq_available",
    "hqq_storage_bits",
    "layer_sensitivity",
    "mark_quantized",
    "matryoshka_codes",
    "pack_linear_from_codes",
    "quantize_gptq",
    "quantize_hqq",
    "quantize_matryoshka",
    "truncated_view",
]
