"""Training helpers and the accumulator audit."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from brevitas_a2q import bounds
from brevitas_a2q.audit import accumulator_report
from brevitas_a2q.data import load_digits
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.models import build_cnn
from brevitas_a2q.training import (
    a2q_penalty,
    accumulator_targets,
    accuracy,
    euclidean_projection_init,
    project_onto_l1_ball,
    set_accumulator_bit_width,
    train_epochs,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def reference_projection(v: np.ndarray, radius: float) -> np.ndarray:
    """Projection onto the L1 ball by bisection on the soft threshold (independent of Duchi's sort)."""
    if np.abs(v).sum() <= radius:
        return v
    lo, hi = 0.0, float(np.abs(v).max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.clip(np.abs(v) - mid, 0, None).sum() > radius:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.clip(np.abs(v) - hi, 0, None)


@given(seed=st.integers(0, 10_000), k=st.integers(1, 50), radius=st.floats(1e-3, 50))
@settings(max_examples=200, deadline=None)
def test_projection_matches_a_bisection_reference(seed, k, radius):
    v = np.random.default_rng(seed).standard_normal((3, k))
    ours = project_onto_l1_ball(torch.tensor(v), torch.full((3,), radius, dtype=torch.float64)).numpy()
    for row, expected in zip(ours, v, strict=True):
        np.testing.assert_allclose(row, reference_projection(expected, radius), atol=1e-9)


def test_targets_with_overrides_by_name_and_pattern():
    model = build_cnn("a2q", acc_bits=16)
    targets = set_accumulator_bit_width(model, 12, {"conv1": 20, "f*": 14})
    assert targets == {"conv1": 20, "conv2": 12, "fc": 14} == accumulator_targets(model)
    with pytest.raises(A2QInputError, match="'dense' matches no A2Q layer.*conv1, conv2, fc"):
        set_accumulator_bit_width(model, 12, {"dense": 12})
    with pytest.raises(ValueError, match="layer 'fc'"):
        set_accumulator_bit_width(model, 12, {"fc": 0})


def test_a_new_target_takes_effect_on_a_trained_model(digits):
    train, test = digits
    model = build_cnn("a2q+", acc_bits=16)
    train_epochs(model, train, 1, progress=False)
    set_accumulator_bit_width(model, 11, {"conv1": 16})
    report = accumulator_report(model, test.tensors[0][:64])
    assert [r.target_bits for r in report] == [16, 11, 11]
    assert all(r.bits_exact_range <= r.target_bits for r in report)


def test_ep_init_satisfies_the_bound_and_zeroes_the_penalty(digits):
    train, test = digits
    torch.manual_seed(0)
    plain = build_cnn("none")
    train_epochs(plain, train, 2, progress=False)
    model = build_cnn("a2q+", acc_bits=11)
    model.load_state_dict({k: v for k, v in plain.state_dict().items() if "weight_quant" not in k},
                          strict=False)
    x = test.tensors[0][:64]
    projected = euclidean_projection_init(model, x)
    assert projected["fc"] > 0  # the pretrained weights were outside the ball
    model.train()
    model(x)
    assert a2q_penalty(model).item() < 1e-3
    with torch.no_grad():  # push g above s*T: the penalty sees it
        model.conv2.weight_quant.tensor_quant.pre_scaling_impl.value.add_(3.0)
    assert a2q_penalty(model).item() > 1.0


def test_ep_init_beats_default_init_at_a_narrow_accumulator(digits):
    train, test = digits
    torch.manual_seed(0)
    plain = build_cnn("none")
    train_epochs(plain, train, 3, progress=False)
    state = {k: v for k, v in plain.state_dict().items() if "weight_quant" not in k}
    results = {}
    for ep in (False, True):
        torch.manual_seed(1)
        model = build_cnn("a2q+", acc_bits=11)
        model.load_state_dict(state, strict=False)
        if ep:
            euclidean_projection_init(model, test.tensors[0][:256])
        train_epochs(model, train, 1, lr=3e-3, progress=False)
        results[ep] = accuracy(model, test)
    assert results[True] > results[False] + 0.05  # measured: 0.80 vs 0.63


@pytest.mark.parametrize("quant", ["a2q", "a2q+", "brevitas-a2q", "brevitas-a2q+", "none"])
def test_report_of_any_brevitas_model(quant, digits):
    _, test = digits
    model = build_cnn(quant, acc_bits=12)
    report = accumulator_report(model, test.tensors[0][:32])
    assert [r.layer for r in report] == ["conv1", "conv2", "fc"]
    for r in report:
        assert r.dot_length == {"conv1": 9, "conv2": 144, "fc": 128}[r.layer]
        assert (r.input_bits, r.input_signed) == ((8, True) if r.layer == "conv1" else (4, False))
        assert r.bits_exact_range <= r.bits_l1_bound <= r.bits_datatype
        if quant == "none":
            assert r.target_bits is None and r.target_holds is None
        else:
            assert r.target_bits == 12 and r.target_holds
    assert json.loads(report.to_json())[0]["layer"] == "conv1"
    assert "P(exact)" in report.table()


def test_report_exact_width_matches_a_direct_computation(digits):
    _, test = digits
    model = build_cnn("none")
    report = accumulator_report(model, test.tensors[0][:32])
    q = model.fc.quant_weight().int().numpy()
    expected = bounds.exact_accumulator_range(q, 0, 15).signed_bits
    assert report[2].bits_exact_range == expected
    assert report[2].l1_norm_max == int(np.abs(q).sum(axis=1).max())
