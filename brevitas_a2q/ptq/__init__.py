"""Accumulator-aware post-training quantization: from a float model and a little calibration
data to a Brevitas model with this package's A2Q/A2Q+ quantizers whose integer weights provably
fit each layer's target accumulator width ``P``, without training.

Owns the conversion of float models (the reference CNN/MLP, or any ``nn.Module`` through
Brevitas's layer swapping) and the writing of chosen integers into the quantizers
(:mod:`.convert`), activation calibration and the input moments of each layer
(:mod:`.calibration`), the accumulator-constrained error-correcting greedy rounding
(:mod:`.rounding`: GPFQ/OPTQ-style, every step within the exact integer L1 budget of A2Q/A2Q+)
and the pipeline that runs them layer by layer and audits the result (:mod:`.pipeline`).

References: AXE, Colbert, Pappalardo, Petri-Koenig, Umuroglu, "Accumulator-Aware Post-Training
Quantization", TMLR 2025 (arXiv:2409.17092); GPFQ, Lybrand & Saab, "A Greedy Algorithm for
Quantizing Neural Networks", JMLR 2021; OPTQ, Frantar et al., ICLR 2023. May import
:mod:`brevitas_a2q.quant`, :mod:`brevitas_a2q.analysis` and :mod:`brevitas_a2q.train`; never
:mod:`brevitas_a2q.cli`.
"""

from __future__ import annotations

from brevitas_a2q._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "ChannelBudget": "brevitas_a2q.ptq.rounding",
    "constrained_greedy_round": "brevitas_a2q.ptq.rounding",
    "l1_threshold": "brevitas_a2q.ptq.rounding",
    "calibrate_activations": "brevitas_a2q.ptq.calibration",
    "input_moments": "brevitas_a2q.ptq.calibration",
    "layerwise_a2q": "brevitas_a2q.ptq.convert",
    "load_integer_weights": "brevitas_a2q.ptq.convert",
    "quantized_twin": "brevitas_a2q.ptq.convert",
    "PTQResult": "brevitas_a2q.ptq.pipeline",
    "quantize_weights": "brevitas_a2q.ptq.pipeline",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
