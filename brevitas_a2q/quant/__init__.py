"""The quantizers and their math: A2Q and A2Q+ weight quantizers for Brevitas.

Owns the exact accumulator bounds (:mod:`.bounds`: the L1 bound ``T`` of A2Q Eq. 15 / A2Q+ Eq. 18,
minimum accumulator widths, exact ranges), the per-output-channel views of every layer's weight
(:mod:`.channels`), the pre-scaling modules plugged into Brevitas's decoupled integer quantizer
(:mod:`.pre_scaling`), the integer rounding (:mod:`.rounding`: round-to-zero or budgeted), the exact
guard on the integers (:mod:`.guard`) and the ``ExtendedInjector`` quantizers users pass as
``weight_quant=`` (:mod:`.quantizers`). Imports Brevitas and torch; of this package, only
:mod:`brevitas_a2q.errors` and (to register export handlers) :mod:`brevitas_a2q.export.handlers`.
"""

from __future__ import annotations

from brevitas_a2q._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "A2QWeightQuant": "brevitas_a2q.quant.quantizers",
    "A2QPlusWeightQuant": "brevitas_a2q.quant.quantizers",
    "A2QBudgetedWeightQuant": "brevitas_a2q.quant.quantizers",
    "A2QPlusBudgetedWeightQuant": "brevitas_a2q.quant.quantizers",
    "A2QWeightQuantProxy": "brevitas_a2q.quant.quantizers",
    "is_a2q_proxy": "brevitas_a2q.quant.quantizers",
    "l1_norm_bound": "brevitas_a2q.quant.bounds",
    "min_accumulator_bits": "brevitas_a2q.quant.bounds",
    "datatype_accumulator_bits": "brevitas_a2q.quant.bounds",
    "exact_accumulator_range": "brevitas_a2q.quant.bounds",
    "AccumulatorAwarePreScaling": "brevitas_a2q.quant.pre_scaling",
    "AccumulatorAwareZeroCenterPreScaling": "brevitas_a2q.quant.pre_scaling",
    "L1NormBound": "brevitas_a2q.quant.pre_scaling",
    "OutputChannelView": "brevitas_a2q.quant.channels",
    "OutputChannelZeroCenter": "brevitas_a2q.quant.channels",
    "ROUNDINGS": "brevitas_a2q.quant.rounding",
    "budgeted_take_back": "brevitas_a2q.quant.rounding",
    "AccumulatorGuardedIntQuant": "brevitas_a2q.quant.guard",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
