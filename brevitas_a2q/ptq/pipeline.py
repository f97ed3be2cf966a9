"""The PTQ pipeline: activation calibration, then layer by layer (in execution order) the
accumulator-constrained error-correcting rounding, the integers written into the quantizer and
checked exactly, optionally a bias/BatchNorm correction, and the accumulator audit at the end.

References: AXE (Colbert, Pappalardo, Petri-Koenig, Umuroglu, "Accumulator-Aware Post-Training
Quantization", TMLR 2025), GPFQ (Lybrand & Saab, JMLR 2021), OPTQ (Frantar et al., ICLR 2023),
A2Q (Colbert et al., ICCV 2023) and A2Q+ (Colbert et al., ICML 2024).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from brevitas_a2q.analysis.audit import (
    AccumulatorReport,
    accumulator_report,
    capture_layers,
    iter_accumulating_layers,
)
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.ptq.calibration import calibrate_activations, input_moments
from brevitas_a2q.ptq.convert import load_integer_weights
from brevitas_a2q.ptq.rounding import ChannelBudget, constrained_greedy_round
from brevitas_a2q.quant.bounds import min_accumulator_bits
from brevitas_a2q.train.targets import _accumulator_aware_layers, _channel_view, _pre_scaling

__all__ = ["LayerPTQ", "PTQResult", "execution_order", "quantize_weights"]

OBJECTIVES = ("gpfq", "optq")


@dataclass
class LayerPTQ:
    """What the rounding did to one layer."""

    layer: str
    target_bits: int  # P
    input_bits: int  # N
    input_signed: bool
    floor_t: int  # the exact integer budget floor(T)
    zero_centered: bool
    l1_norm_max: int  # largest ||q||_1 over channels
    budget_used_max: float  # largest share of its budget a channel uses
    relative_error: float  # || X~ s q - X w ||^2 / || X w ||^2 on the calibration data
    zero_channels: int
    bias_corrected: str | None = None  # "bias", "batchnorm" or None


@dataclass
class PTQResult:
    """The quantized model (changed in place), per-layer rounding records and the audit."""

    model: nn.Module
    layers: list[LayerPTQ]
    report: AccumulatorReport
    settings: dict = field(default_factory=dict)

    @property
    def all_hold(self) -> bool | None:
        return self.report.all_hold

    def to_dict(self) -> dict:
        return {"settings": self.settings, "rounding": [asdict(r) for r in self.layers],
                "audit": self.report.to_dict()}


@torch.no_grad()
def execution_order(model: nn.Module, example: Tensor) -> list[str]:
    """Names of the accumulating (Quant Linear/Conv) layers in the order one forward pass calls
    them."""
    order: list[str] = []
    handles = [layer.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
               for name, layer in iter_accumulating_layers(model)]
    try:
        model.eval()
        model(example)
    finally:
        for h in handles:
            h.remove()
    seen: set = set()
    return [n for n in order if not (n in seen or seen.add(n))]


def _float_rows(float_model: nn.Module, name: str, quant_layer: nn.Module) -> Tensor:
    try:
        layer = float_model.get_submodule(name)
    except AttributeError:
        raise A2QInputError(f"the float model has no layer {name!r}") from None
    w = layer.weight.detach()
    if w.shape != quant_layer.weight.shape:
        raise A2QInputError(f"layer {name!r}: float weight {tuple(w.shape)} and quantized "
                            f"weight {tuple(quant_layer.weight.shape)} differ in shape")
    return _channel_view(quant_layer)(w).to(torch.float64)


# ridge of the GPFQ target towards the float weights, relative to the mean of diag(H): chosen
# among 0.01, 0.1 and 1 on Fashion-MNIST (docs/ptq.md); 0.01 towards zero overfit the classifier
TARGET_DAMPING = 0.1


def _target(rows: Tensor, moments, objective: str) -> Tensor:
    """The continuous target ``w'`` per row: OPTQ's ``w`` itself, or GPFQ's least-squares
    ``argmin ||X~ w' - X w||^2 + lambda ||w' - w||^2 = (H + lambda I)^-1 (C w + lambda w)``
    (``C = X~^T X``), which folds the error of earlier layers into the target; the ridge towards
    ``w`` (``lambda`` = :data:`TARGET_DAMPING` times the mean of ``diag H``) keeps it from fitting
    the calibration set where it has fewer samples than the layer has inputs."""
    if objective == "optq":
        return rows
    h = moments.hessian
    damp = TARGET_DAMPING * float(torch.diag(h).mean().clamp(min=1e-12))
    h = h + damp * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.solve(h, moments.cross @ rows.T + damp * rows.T).T


def _layer_budget(layer: nn.Module, cap, name: str) -> ChannelBudget:
    pre = _pre_scaling(layer)
    n, signed, p = cap.input_bits, bool(cap.input_signed), cap.target_bits
    zero_centered = pre.zero_centered
    if min_accumulator_bits(1, n, signed, zero_centered) > p:
        need = min_accumulator_bits(1, n, signed, zero_centered)
        raise A2QInputError(f"layer {name!r}: target P={p} is too small for its {n}-bit "
                            f"{'signed' if signed else 'unsigned'} input (its L1 bound admits no "
                            f"non-zero integer weight); use P >= {need} for {name} "
                            f"(--layer-acc-bits {name}={need})")
    return ChannelBudget(pre.bound.floor(p, n, signed), zero_centered, 2 ** (cap.weight_bits - 1) - 1)


@torch.no_grad()
def _correct_bias(quant_model: nn.Module, float_model: nn.Module, name: str, data: Tensor,
                  batch_size: int) -> str | None:
    """Shift the layer's bias (or, with none, the running mean of the BatchNorm that reads its
    output) by the mean per-channel output difference float - quantized on ``data``."""
    layer = quant_model.get_submodule(name)
    float_layer = float_model.get_submodule(name)
    outs: dict = {"q": [], "f": [], "bn": None}

    def on_bn(module, args, out_id=outs):
        if out_id["q_last"] is not None and args[0] is out_id["q_last"]:
            out_id["bn"] = module

    def keep_q(m, a, out):
        outs["q_last"] = out
        outs["q"].append((out.value if hasattr(out, "value") else out).detach())

    outs["q_last"] = None
    handles = [layer.register_forward_hook(keep_q),
               float_layer.register_forward_hook(lambda m, a, out: outs["f"].append(out.detach()))]
    handles += [m.register_forward_pre_hook(on_bn) for m in quant_model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        for start in range(0, len(data), batch_size):
            quant_model(data[start:start + batch_size])
            float_model(data[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
    dims = [0] + list(range(2, outs["q"][0].dim()))
    delta = (torch.cat(outs["f"]) - torch.cat(outs["q"])).mean(dim=dims)
    if layer.bias is not None:
        layer.bias.add_(delta.to(layer.bias.dtype))
        return "bias"
    bn = outs["bn"]
    if bn is not None and bn.running_mean is not None and bn.running_mean.numel() == delta.numel():
        bn.running_mean.sub_(delta.to(bn.running_mean.dtype))
        return "batchnorm"
    return None


def _check_exact(quant_model: nn.Module, example: Tensor, name: str, q: Tensor) -> None:
    """The integers the quantizer computes for ``name`` must be exactly ``q`` (else a bug)."""
    cap = next(c for c in capture_layers(quant_model, example) if c.name == name)
    got = cap.rows.to(torch.int64)
    if not torch.equal(got, q):
        bad = int((got != q).any(dim=1).sum())
        raise RuntimeError(f"layer {name!r}: the quantizer reproduces the chosen integers in "
                           f"only {len(q) - bad} of {len(q)} channels (a bug)")


def quantize_weights(quant_model: nn.Module, float_model: nn.Module, calibration: Tensor, *,
                     objective: str = "gpfq", act_order: bool = True, correct_bias: bool = True,
                     calibrate: bool = True, batch_size: int = 128, progress: bool = False,
                     example: Tensor | None = None) -> PTQResult:
    """Post-training quantization of ``quant_model`` (a Brevitas model whose accumulating layers
    carry this package's budgeted A2Q/A2Q+ quantizers and targets, e.g. from
    :func:`~brevitas_a2q.ptq.convert.quantized_twin`) towards ``float_model`` (same layer names
    and weight shapes) on ``calibration`` inputs:

    1. activation scales from ``calibration`` (Brevitas's ``calibration_mode``);
    2. per layer, in execution order: input moments with the earlier layers already quantized,
       :func:`~brevitas_a2q.ptq.rounding.constrained_greedy_round` within the exact budget of the
       layer's target ``P`` (``objective`` "gpfq": match the float layer's output, "optq": match
       its weights on the quantized inputs), the integers written into the quantizer and checked
       exactly, then (``correct_bias``) the mean output error moved into the bias or the
       following BatchNorm's running mean;
    3. the accumulator audit (:func:`~brevitas_a2q.analysis.audit.accumulator_report`).
    """
    from tqdm.auto import tqdm

    if objective not in OBJECTIVES:
        raise A2QInputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if len(calibration) == 0:
        raise A2QInputError("no calibration data")
    example = calibration[:batch_size] if example is None else example
    if calibrate:
        calibrate_activations(quant_model, calibration, batch_size)
    a2q_layers = _accumulator_aware_layers(quant_model)
    order = [n for n in execution_order(quant_model, example) if n in a2q_layers]
    if not order:
        raise A2QInputError("the model has no layer with this package's A2Q/A2Q+ quantizer")
    captures = {c.name: c for c in capture_layers(quant_model, example)}
    records = []
    for name in tqdm(order, desc="rounding layers", disable=None if progress else True,
                     leave=False):
        layer = a2q_layers[name]
        cap = captures[name]
        budget = _layer_budget(layer, cap, name)
        moments = input_moments(quant_model, float_model, name, calibration, batch_size)
        rows = _float_rows(float_model, name, layer)
        result = constrained_greedy_round(_target(rows, moments, objective), moments.hessian,
                                          budget, act_order=act_order)
        load_integer_weights(layer, result.q, result.scale)
        _check_exact(quant_model, example, name, result.q)
        corrected = _correct_bias(quant_model, float_model, name, calibration, batch_size) \
            if correct_bias else None
        records.append(_record(name, cap, budget, result, rows, moments, corrected))
    report = accumulator_report(quant_model, example)
    settings = {"objective": objective, "act_order": act_order, "correct_bias": correct_bias,
                "calibration_samples": len(calibration)}
    return PTQResult(quant_model, records, report, settings)


def _record(name, cap, budget: ChannelBudget, result, rows: Tensor, moments, corrected
            ) -> LayerPTQ:
    q = result.q
    if budget.zero_centered:
        used = torch.maximum(q.clamp(min=0).sum(1), (-q).clamp(min=0).sum(1)).to(torch.float64) \
            / max(budget.per_sign, 1)
    else:
        used = q.abs().sum(1).to(torch.float64) / max(budget.floor_t, 1)
    # || X~ s q - X w ||^2 relative to || X w ||^2, from the moments (exact on the calibration set)
    deq = q.to(torch.float64) * result.scale.to(torch.float64).unsqueeze(1)
    h, c = moments.hessian, moments.cross
    xw = (rows @ moments.float_hessian * rows).sum()
    err = (deq @ h * deq).sum() - 2 * (deq @ c * rows).sum() + xw
    return LayerPTQ(layer=name, target_bits=cap.target_bits, input_bits=cap.input_bits,
                    input_signed=bool(cap.input_signed), floor_t=budget.floor_t,
                    zero_centered=budget.zero_centered,
                    l1_norm_max=int(q.abs().sum(1).max()), budget_used_max=float(used.max()),
                    relative_error=float(err / xw) if float(xw) > 0 else 0.0,
                    zero_channels=int((q.abs().sum(1) == 0).sum()), bias_corrected=corrected)

