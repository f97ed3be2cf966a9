"""Simulated low bit-width accumulators (Blumenfeld, Hubara, Soudry, ICLR 2024, arXiv:2401.14110).

Owns accumulator formats (:mod:`.config`: integer wrap/saturate and low-precision floating point;
:mod:`.float_format`), the reference accumulation chain (:mod:`.chain`, the test oracle), its fast
forward path (:mod:`.fast`), saturating integers by blocks of exact matrix-product sums
(:mod:`.saturating`, kernels in :mod:`._jit_blocks`), compiled kernels of the chain
(:mod:`.kernels`: numba on CPU in :mod:`._jit`, its event log in :mod:`._jit_events`, numba.cuda
on GPUs in :mod:`._cuda`; the torch chain where they cannot run, said once by a warning;
``BREVITAS_A2Q_SIM_KERNELS=torch`` selects it), gradients through it (:mod:`.gradients`:
identity STE and the fine-grained ``immediate`` / ``recursive`` estimators; of a whole
convolution without keeping its unfolded input, :mod:`.conv_gradients`), event counts
(:mod:`.stats`), Brevitas layers patched to use it (:mod:`.layers`, convolutions unfolded by
:mod:`.unfold`, transposed ones computed as direct ones by :mod:`.transposed`) and evaluation /
fine-tuning under it (:mod:`.evaluate`). May import :mod:`brevitas_a2q.analysis` (to find layers) and
:mod:`brevitas_a2q.train` (the loop).

Simulated low bit-width accumulators for any Brevitas model's quantized Linear/Conv layers.

Inside ``with simulate_accumulators(model, "int12-sat") as stats:`` every ``QuantLinear``,
``QuantConv1d``, ``QuantConv2d``, ``QuantConvTranspose1d`` and ``QuantConvTranspose2d`` computes
its dot products as a ``P``-bit integer accumulator (two's-complement wraparound or saturation) or
a low-precision floating-point accumulator would, and ``stats`` counts overflow (and, for floating
point, swamping/underflow) events per layer. The layers' forward is restored on exit. This is the
evaluation and fine-tuning method of Blumenfeld, Hubara, Soudry, "Towards Cheaper Inference in Deep
Networks with Lower Bit-Width Accumulators", ICLR 2024 (arXiv:2401.14110), and the tool that shows
what happens to a model that is not overflow-safe (A2Q, arXiv:2308.13504, guarantees there is
nothing to see).

What is accumulated
    The layer's quantized input ``x`` (an ``IntQuantTensor``: ``x.value / x.scale`` are integers,
    i.e. the codes minus the zero point) and its quantized weights (``quant_weight()``, integers
    ``value / scale`` per output channel). Integer accumulators sum the integer products
    ``x_int[k] * w_int[o, k]``; the result is rescaled by ``input_scale * weight_scale[o]``.
    Floating-point accumulators sum the real-valued products ``x.value[k] * w.value[o, k]``
    (each exact in float64) in the low-precision format (:class:`FloatFormat`). The bias (if any,
    as Brevitas quantizes it) is added after accumulation, in float32, as is the layer's output
    quantizer. An input quantized per channel (as Brevitas's MobileNetV1 quantizes the
    activations before its depthwise convolutions) has its integers rescaled by each output's
    own input scale where every group of the convolution reads channels of one scale (a
    depthwise convolution); a floating-point accumulator takes any input scale, since the
    scales play no part in its real-valued products. Elsewhere an integer accumulator needs
    the input's scale per tensor.

Order of accumulation (matters for saturation and floating point; wraparound is associative)
    A convolution is unfolded to matrix form, ``(batch * positions, K) x (K, out)``, with
    ``K = in_channels/groups * kernel`` in PyTorch's ``unfold`` order (input channel major, then
    kernel rows, then columns). With ``chunk_size = C`` the ``K`` products are split into
    consecutive chunks of ``C``; each chunk is a sequential chain ``acc = A(acc + p_k)`` from
    ``acc = 0`` in increasing ``k``, then the chunk results are added sequentially, in chunk
    order, in the same accumulator ``A`` (``A`` = clamp to ``[-2^(P-1), 2^(P-1) - 1]``, or rounding
    to the float format: fused multiply-add, one rounding per addition). Without ``chunk_size``
    the whole row is one chain. A transposed convolution accumulates as the direct convolution
    that computes it (:mod:`.transposed`: zeros inserted between the input's elements, the
    kernel flipped, as FINN lowers it): input channel major, then the flipped kernel's rows and
    columns, the inserted zeros' products (no change, no event) counted among the additions.

Events
    * integer wraparound: an output is an overflow event when its exact sum is outside the
      ``P``-bit range (the wrapped result is then wrong; intermediate wraps that cancel are
      harmless and not counted).
    * integer saturation / floating point: every addition whose exact result is outside the range
      (saturated) is an overflow event; for floating point, a *swamping* event is an addition
      whose exact result differs from the accumulator but which leaves it unchanged (and did not
      overflow), an
      *underflow* event an addition whose non-zero exact result rounds to zero (a non-zero
      addend to a zero accumulator that stays zero is both).

Gradients (``gradient=``)
    * ``"ste"``: identity straight-through estimator. The backward pass is that of the exact
      (unsimulated) layer: ``dL/dx`` and ``dL/dw`` as if the accumulator were exact.
    * ``"immediate"``: fine-grained STE (Blumenfeld et al., Sec. 4). An addition with an event
      (overflow/saturation, swamping, underflow) passes no gradient to its addend: a product
      ``x_k * w_ok`` whose own addition had an event gets zero gradient, and so do all products of
      a chunk whose addition to the running total had an event. Gradient through the running sum
      is kept.
    * ``"recursive"``: an event also stops the gradient through the running sum, so it reaches no
      product added at or before it: product ``k`` of chunk ``c`` gets gradient iff no addition at
      position ``>= k`` in chunk ``c`` and no chunk addition at chunk ``>= c`` had an event.

    For wraparound only the final result can be wrong, so both fine-grained modes give zero
    gradient to every product of an output that overflowed (and identity otherwise).
"""

from __future__ import annotations

from brevitas_a2q._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "AccumulatorConfig": "brevitas_a2q.sim.config",
    "GRADIENT_MODES": "brevitas_a2q.sim.config",
    "parse_accumulator": "brevitas_a2q.sim.config",
    "FloatFormat": "brevitas_a2q.sim.float_format",
    "LayerStats": "brevitas_a2q.sim.stats",
    "SimulationStats": "brevitas_a2q.sim.stats",
    "simulate_matmul": "brevitas_a2q.sim.gradients",
    "simulate_accumulators": "brevitas_a2q.sim.layers",
    "evaluate_accuracy": "brevitas_a2q.sim.evaluate",
    "finetune": "brevitas_a2q.sim.evaluate",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
