"""Clear, named errors for impossible settings and unquantized inputs."""

import pytest
import torch
from brevitas.nn import QuantConv2d, QuantLinear
from brevitas.quant import Int8ActPerTensorFloat
from torch import nn

from brevitas_a2q import A2QPlusWeightQuant, A2QWeightQuant
from brevitas_a2q.analysis.audit import accumulator_report
from brevitas_a2q.errors import A2QInputError


@pytest.mark.parametrize("quant", [A2QWeightQuant, A2QPlusWeightQuant])
def test_unquantized_input_names_the_layer_and_the_fix(quant):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                          QuantLinear(8, 3, weight_quant=quant, weight_accumulator_bit_width=12))
    with pytest.raises(A2QInputError) as err:
        accumulator_report(model, torch.randn(2, 4))
    message = str(err.value)
    assert "layer '2'" in message and "QuantLinear" in message
    assert "input_quant=" in message and "return_quant_tensor=True" in message


def test_unquantized_input_without_a_name_still_says_what_to_do():
    layer = QuantConv2d(2, 4, 3, weight_quant=A2QWeightQuant, weight_accumulator_bit_width=12)
    with pytest.raises(A2QInputError, match=r"QuantConv2d, weight 4x2x3x3.*input_quant="):
        layer(torch.randn(1, 2, 5, 5))


@pytest.mark.parametrize("quant,needed", [(A2QWeightQuant, 9), (A2QPlusWeightQuant, 9)])
def test_accumulator_too_small_for_the_input_names_the_values(quant, needed):
    layer = QuantLinear(8, 3, weight_quant=quant, weight_accumulator_bit_width=8,
                        input_quant=Int8ActPerTensorFloat)
    with pytest.raises(A2QInputError, match=rf"weight_accumulator_bit_width=8 .* 8-bit signed.*"
                                            rf">= {needed}"):
        layer(torch.randn(2, 8))


@pytest.mark.parametrize("kwargs,name", [
    ({"weight_accumulator_bit_width": 0}, "weight_accumulator_bit_width"),
    ({"weight_accumulator_bit_width": -4}, "weight_accumulator_bit_width"),
    ({"weight_accumulator_bit_width": 12.5}, "weight_accumulator_bit_width"),
    ({"weight_bit_width": 0}, "weight_bit_width"),
])
def test_non_positive_or_fractional_bit_widths_fail_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        QuantLinear(8, 3, weight_quant=A2QWeightQuant, input_quant=Int8ActPerTensorFloat,
                    **kwargs)


def test_outputs_are_atomic_refuse_overwrite_and_get_normal_permissions(tmp_path):
    import os

    from brevitas_a2q.io import atomic_output

    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("failed while writing")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(A2QInputError, match="already exists.*overwrite"), atomic_output(target):
        pass
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("again")
    assert target.read_text() == "again"


def test_input_and_output_path_checks_name_the_path_and_the_problem(tmp_path):
    from brevitas_a2q.io import check_input_file, check_output_dir, check_writable

    (tmp_path / "d").mkdir()
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(A2QInputError, match=r"model .*d is a directory, not a file"):
        check_input_file(tmp_path / "d", "model")
    with pytest.raises(A2QInputError, match=r"nope does not exist"):
        check_input_file(tmp_path / "nope")
    with pytest.raises(A2QInputError, match=r"--plot .*d is a directory"):
        check_writable(tmp_path / "d", what="--plot")
    with pytest.raises(A2QInputError, match=r"must end in \.png"):
        check_writable(tmp_path / "w.jpg", suffix=".png")
    with pytest.raises(A2QInputError, match=r"f\.txt is a file, not a directory"):
        check_output_dir(tmp_path / "f.txt")
    with pytest.raises(A2QInputError, match=r"f\.txt is a file, not a directory"):
        check_output_dir(tmp_path / "f.txt" / "sub")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
