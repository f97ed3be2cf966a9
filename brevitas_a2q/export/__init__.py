"""Exact QONNX export that carries each layer's accumulator width.

Owns :func:`export_qonnx` (:mod:`.qonnx`: Brevitas's exporter with every weight replaced by the
integers the layer really computes with, plus an accumulator record per layer in the file's metadata)
and the export handlers that make Brevitas's own exporters accept this package's quantizers
(:mod:`.handlers`). May import :mod:`brevitas_a2q.quant` and :mod:`brevitas_a2q.analysis`.
"""

from __future__ import annotations

from brevitas_a2q._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "export_qonnx": "brevitas_a2q.export.qonnx",
    "export_qonnx_model": "brevitas_a2q.export.qonnx",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
