"""Checkpoints of the reference models: a ``torch.save``'d dict ::

    {"format": "brevitas_a2q.train.checkpoint/1",
     "model": {"arch": "cnn" | "mlp", "kwargs": {... for build_cnn / build_mlp}},
     "dataset": "digits" | "fashion-mnist" | "mnist",
     "state_dict": {...},
     "extra": {...}}            # optional, free-form (training settings, metrics)

Written by ``a2q train`` and :func:`save_checkpoint`, read by ``a2q evaluate`` and
:func:`load_checkpoint`, which rebuilds the model with :func:`brevitas_a2q.train.models.build_cnn` /
:func:`~brevitas_a2q.train.models.build_mlp` (the float twin, ``build_float_cnn`` /
``build_float_mlp``, when ``kwargs["quant"] == "float"``: ``a2q train --quant float``, the input
of ``a2q quantize``) and loads the state dict strictly.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.io import atomic_output, check_input_file
from brevitas_a2q.train.data import DATASETS

__all__ = ["ARCHITECTURES", "CHECKPOINT_FORMAT", "Checkpoint", "load_checkpoint", "read_payload",
           "restore_runtime_state", "runtime_state", "save_checkpoint"]

CHECKPOINT_FORMAT = "brevitas_a2q.train.checkpoint/1"
ARCHITECTURES = ("cnn", "mlp")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt ``model`` (eval mode) and what described it."""

    model: nn.Module
    arch: str
    kwargs: dict
    dataset: str
    extra: dict = field(default_factory=dict)


def build_model(arch: str, kwargs: dict) -> nn.Module:
    """``build_cnn(**kwargs)`` or ``build_mlp(**kwargs)``; a clear error for bad settings."""
    from brevitas_a2q.train.models import build_cnn, build_mlp

    if arch not in ARCHITECTURES:
        raise A2QInputError(f"unknown model arch {arch!r}; choose one of "
                            f"{', '.join(ARCHITECTURES)}")
    if not isinstance(kwargs, dict):
        raise A2QInputError(f"model kwargs must be a dict, got {type(kwargs).__name__}")
    builder = build_cnn if arch == "cnn" else build_mlp
    if kwargs.get("quant") == "float":  # `a2q train --quant float`: the float twin
        builder = _float_builder(arch)
    try:
        return builder(**kwargs)
    except TypeError as err:
        raise A2QInputError(f"cannot build the {arch} model from {kwargs}: {err}") from err


def _float_builder(arch: str):
    """``build_float_cnn``/``build_float_mlp`` called with a quantized model's kwargs (the float
    twin has the same layer names and shapes; quantization settings do not apply)."""
    from brevitas_a2q.train.models import build_float_cnn, build_float_mlp

    def build(in_channels: int = 1, image_size: int = 8, in_features: int = 64,
              hidden=(64,), num_classes: int = 10, **_quantization) -> nn.Module:
        if arch == "cnn":
            return build_float_cnn(in_channels, image_size, num_classes)
        return build_float_mlp(in_features, tuple(hidden), num_classes)

    return build


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    arch: str,
    kwargs: dict,
    dataset: str = "digits",
    extra: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s state dict with the ``arch``/``kwargs`` it was built from (checked by
    rebuilding and loading it before anything is written). Atomic; refuses to overwrite unless
    ``overwrite``."""
    if dataset not in DATASETS:
        raise A2QInputError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _load_state(build_model(arch, dict(kwargs)), state, f"model built as {arch}{kwargs}")
    payload = {"format": CHECKPOINT_FORMAT, "model": {"arch": arch, "kwargs": dict(kwargs)},
               "dataset": dataset, "state_dict": state, "extra": dict(extra or {})}
    with atomic_output(path, overwrite) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_payload(path: str | os.PathLike) -> dict:
    """The raw ``brevitas_a2q.train.checkpoint/1`` dict in ``path`` (tensors only, ``weights_only``)."""
    path = Path(path)
    if not path.exists():
        raise A2QInputError(f"checkpoint {path} does not exist (write one with `a2q train` or "
                            "brevitas_a2q.train.checkpoint.save_checkpoint)")
    check_input_file(path, "checkpoint")
    if path.stat().st_size == 0:
        raise A2QInputError(f"checkpoint {path} is empty (0 bytes)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's weights_only unpickler refused the file
        if "unsupported global" in str(err).lower():
            why = ("it holds Python objects other than tensors and plain values, which a2q does "
                   "not load: no code from a checkpoint is run")
        else:
            why = "not a torch.save archive"
        raise A2QInputError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint ({why}); write one "
                            "with `a2q train` or brevitas_a2q.train.checkpoint.save_checkpoint"
                            ) from err
    except Exception as err:  # torch raises many types for foreign files (KeyError for text)
        raise A2QInputError(f"{path} is not a readable brevitas_a2q checkpoint (torch.load "
                            f"failed: {_first_line(err)})") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise A2QInputError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (format: {found!r})")
    return payload


def _first_line(err: BaseException) -> str:
    """The first non-empty line of ``err`` without terminal escape codes, or its type's name."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if isinstance(err, KeyError):  # the legacy unpickler reading a byte it has no opcode for
        return "the file is not a torch.save archive"
    first = first.split(". ")[0]  # torch appends paragraphs of advice to the reason
    return first[:300] if first else type(err).__name__


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` and rebuild its model (eval mode)."""
    path = Path(path)
    payload = read_payload(path)
    for key in ("model", "dataset", "state_dict"):
        if key not in payload:
            raise A2QInputError(f"{path}: checkpoint has no {key!r} entry")
    spec = payload["model"]
    if not isinstance(spec, dict) or "arch" not in spec:
        raise A2QInputError(f"{path}: 'model' must be {{'arch': ..., 'kwargs': {{...}}}}")
    dataset = payload["dataset"]
    if dataset not in DATASETS:
        raise A2QInputError(f"{path}: unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    model = build_model(spec["arch"], dict(spec.get("kwargs", {})))
    _load_state(model, payload["state_dict"], str(path))
    model.eval()
    return Checkpoint(model, spec["arch"], dict(spec.get("kwargs", {})), dataset,
                      dict(payload.get("extra") or {}))


def _load_state(model: nn.Module, state: dict, where: str) -> None:
    if not isinstance(state, dict):
        raise A2QInputError(f"{where}: state_dict is a {type(state).__name__}, not a dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = " ".join(str(err).split())
        raise A2QInputError(f"{where}: the state dict does not match the model ({detail[:400]})"
                            ) from err
    problems = []
    if result.missing_keys:
        problems.append(f"missing {_few(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_few(result.unexpected_keys)}")
    if problems:
        raise A2QInputError(f"{where}: the state dict does not match the model "
                            f"({'; '.join(problems)})")


def _few(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ----------------------------------------------------------------------------------------------
# training state that a state dict does not hold (for a bit-identical resume)


def _stats_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that initialize a learned value from running statistics over their first
    ``collect_stats_steps`` training steps (Brevitas ``ParameterFromRuntimeStatsScaling``, the
    activation scales). Their state dict stores the statistics *as* the value and loading it ends
    the collection, so a run resumed in the middle of it would diverge."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "collect_stats_steps") and isinstance(getattr(m, "counter", None), int)}


def runtime_state(model: nn.Module) -> dict:
    """Counters, statistics buffers and raw values of the modules of :func:`_stats_modules`,
    plus the global random number generators (torch, numpy, Python), for :func:`restore_runtime_state`."""
    import random

    import numpy as np

    modules = {}
    for name, m in _stats_modules(model).items():
        entry = {"counter": int(m.counter)}
        for attr in ("buffer", "value"):
            tensor = getattr(m, attr, None)
            if isinstance(tensor, torch.Tensor):
                entry[attr] = tensor.detach().clone()
        modules[name] = entry
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {"modules": modules, "torch_rng": torch.get_rng_state(),
            "numpy_rng": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                          int(has_gauss), float(cached)],
            "python_rng": [py_version, list(py_state), py_gauss]}


@torch.no_grad()
def restore_runtime_state(model: nn.Module, state: dict, where: str = "checkpoint") -> None:
    """Undo what loading a state dict does to the modules of :func:`_stats_modules` (restore their
    counters, buffers and raw values) and restore the random number generators."""
    import random

    import numpy as np

    modules = _stats_modules(model)
    saved = state.get("modules", {})
    if set(saved) != set(modules):
        raise A2QInputError(f"{where}: its runtime statistics name modules "
                            f"{_few(sorted(saved))}, the model has {_few(sorted(modules))}")
    for name, entry in saved.items():
        m = modules[name]
        m.counter = int(entry["counter"])
        for attr in ("buffer", "value"):
            if attr in entry:
                getattr(m, attr).copy_(entry[attr])
    torch.set_rng_state(state["torch_rng"])
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = state["python_rng"]
    random.setstate((version, tuple(py_state), gauss))
