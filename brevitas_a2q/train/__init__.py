"""Training support: the recipes' pieces around the quantizers.

Owns per-layer accumulator targets (:mod:`.targets`), Euclidean-projection init (:mod:`.ep_init`),
the A2Q penalty (:mod:`.penalty`), the training / evaluation loops (:mod:`.loop`), the demo and CLI
models (:mod:`.models`), Brevitas's shipped example networks with our quantizers
(:mod:`.shipped`), offline data sets (:mod:`.data`) and checkpoints (:mod:`.checkpoint`).
Post-training quantization will live here. May import :mod:`brevitas_a2q.quant` and
:mod:`brevitas_a2q.analysis`; never :mod:`brevitas_a2q.cli`.
"""

from __future__ import annotations

from brevitas_a2q._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "accumulator_targets": "brevitas_a2q.train.targets",
    "set_accumulator_bit_width": "brevitas_a2q.train.targets",
    "track_accumulator_inputs": "brevitas_a2q.train.targets",
    "euclidean_projection_init": "brevitas_a2q.train.ep_init",
    "project_onto_l1_ball": "brevitas_a2q.train.ep_init",
    "a2q_penalty": "brevitas_a2q.train.penalty",
    "accuracy": "brevitas_a2q.train.loop",
    "train_epochs": "brevitas_a2q.train.loop",
    "train_one_epoch": "brevitas_a2q.train.loop",
    "load_checkpoint": "brevitas_a2q.train.checkpoint",
    "save_checkpoint": "brevitas_a2q.train.checkpoint",
    "load_dataset": "brevitas_a2q.train.data",
    "load_digits": "brevitas_a2q.train.data",
    "digit_images": "brevitas_a2q.train.data",
    "build_cnn": "brevitas_a2q.train.models",
    "build_mlp": "brevitas_a2q.train.models",
    "shipped_bnn_pynq": "brevitas_a2q.train.shipped",
    "shipped_espcn": "brevitas_a2q.train.shipped",
    "shipped_resnet18": "brevitas_a2q.train.shipped",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
