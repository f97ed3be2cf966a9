"""finn_flow with FINN (pinned dev commit): estimate builds of A2Q models exported by
brevitas_a2q.export, widths within target, and C++ simulation bit-exact; a model without A2Q forced
to the same narrow widths must be caught. Skipped, naming what is missing, where FINN is not
importable."""

from __future__ import annotations

import json

import pytest
import torch

from brevitas_a2q.data import load_digits
from brevitas_a2q.export import export_qonnx
from brevitas_a2q.models import build_cnn, build_mlp
from brevitas_a2q.training import euclidean_projection_init
from finn_flow import build, cppsim_available, finn_available

FINN_OK, FINN_REASON = finn_available()
CPPSIM_OK, CPPSIM_REASON = cppsim_available() if FINN_OK else (False, FINN_REASON)

pytestmark = [pytest.mark.finn, pytest.mark.slow,
              pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")]


def _trained(model: torch.nn.Module, a2q: bool, steps: int = 60) -> torch.nn.Module:
    """Short training on digits; A2Q layers start from the Euclidean-projection init (without
    it, narrow targets can round whole layers to zero)."""
    torch.manual_seed(0)
    train, _ = load_digits()
    if a2q:
        euclidean_projection_init(model, train.tensors[0][:1])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model.train()
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    x = load_digits()[0].tensors[0][:1]
    paths = {}
    for name, model in [("mlp_a2q", build_mlp("a2q", acc_bits=12, hidden=(32,))),
                        ("cnn_a2q", build_cnn("a2q", acc_bits=12, channels=(4, 8))),
                        ("mlp_none", build_mlp("none", acc_bits=None, hidden=(32,)))]:
        torch.manual_seed(0)
        paths[name] = root / f"{name}.onnx"
        export_qonnx(_trained(model, a2q="a2q" in name), x, paths[name])
    return paths


@pytest.mark.parametrize("name", ["mlp_a2q", "cnn_a2q"])
def test_estimate_build_widths_within_target(exported, tmp_path, name):
    result = build(exported[name], tmp_path / "out")
    assert (tmp_path / "out/report/estimate_layer_resources.json").exists()
    data = json.loads(result.reports["json"].read_text())
    assert len(data["layers"]) == (2 if name == "mlp_a2q" else 3)
    for row in data["layers"]:
        assert row["target_bits"] == 12 and row["bits"] <= 12, row
        assert row["bits"] <= row["finn_bits"]
        assert row["lut_chosen"] <= row["lut_int32"]


@pytest.mark.skipif(not CPPSIM_OK, reason=f"C++ simulation unavailable: {CPPSIM_REASON}")
def test_cppsim_bit_exact_for_a2q_mlp(exported, tmp_path):
    real = load_digits()[1].tensors[0][:5].numpy()
    result = build(exported["mlp_a2q"], tmp_path / "out", verify=["cppsim"], verify_inputs=real,
                   random_count=5)
    assert result.verified, [v.to_dict() for v in result.verification]
    assert {v.kind for v in result.verification} == {"random", "real", "extreme"}


@pytest.mark.skipif(not CPPSIM_OK, reason=f"C++ simulation unavailable: {CPPSIM_REASON}")
def test_cppsim_catches_plain_model_forced_to_narrow_accumulators(exported, tmp_path):
    result = build(exported["mlp_none"], tmp_path / "out", verify=["cppsim"], random_count=5,
                   force_accumulator_bits=10)
    extreme = next(v for v in result.verification if v.kind == "extreme")
    assert result.verified is False and extreme.matched < extreme.inputs
