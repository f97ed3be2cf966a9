"""The A2Q regularizer ``sum relu(g - s * T)`` that keeps the learned norm from sticking above
the clamp (A2Q, Colbert et al., ICCV 2023, Sec. 4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant.bounds import l1_norm_bound
from brevitas_a2q.quant.quantizers import is_a2q_proxy
from brevitas_a2q.train.targets import (
    _accumulator_aware_layers,
    _is_zero_centered,
    _pre_scaling,
    _target_bits,
)


def a2q_penalty(model: nn.Module) -> Tensor:
    """A2Q regularizer ``sum_layers sum_c relu(g_c - s_c * T)`` (Colbert et al. 2023, Sec. 5.1).

    It keeps the learned norm ``g`` from drifting above the clamp ``s * T``, where it would get no
    gradient. Uses each layer's input bit width and sign from its latest forward pass; add it to
    the loss with a small weight (the paper uses ~1e-3). Brevitas's built-in A2Q/A2Q+ layers are
    included once :func:`track_accumulator_inputs` has hooked them (``train_one_epoch`` does).
    Plain QAT has no ``g`` and no bound: the penalty does not apply to it.
    """
    terms = []
    for name, layer in _accumulator_aware_layers(model).items():
        pre = _pre_scaling(layer)
        if getattr(pre, "last_input", None) is None:
            hint = ("" if is_a2q_proxy(layer.weight_quant) else
                    " (Brevitas's built-in A2Q layers: call brevitas_a2q.train."
                    "track_accumulator_inputs(model) before the forward pass)")
            raise A2QInputError(f"layer {name!r} has not run a forward pass yet; compute the "
                                f"penalty after the model's forward{hint}")
        bound = float(l1_norm_bound(_target_bits(pre), *pre.last_input, _is_zero_centered(pre)))
        weights = pre.stats_input_view_shape_impl(layer.weight)
        g = pre.restrict_clamp_scaling(pre.value)
        s = pre.scaling_impl(weights)
        terms.append(torch.relu(g - s * bound).sum())
    if not terms:
        raise A2QInputError("the model has no layer with an A2Q/A2Q+ weight quantizer")
    return torch.stack(terms).sum()
