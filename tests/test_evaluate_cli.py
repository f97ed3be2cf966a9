"""``a2q evaluate`` and the checkpoint format: results equal the library's, bad input exits 2."""

from __future__ import annotations

import json

import pytest
import torch

from brevitas_a2q.cli import main
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.sim.evaluate import evaluate_accuracy
from brevitas_a2q.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from brevitas_a2q.train.data import load_digits
from brevitas_a2q.train.models import build_mlp

torch.set_num_threads(1)

KWARGS = {"quant": "none", "weight_bits": 4, "act_bits": 4, "hidden": (32,)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from brevitas_a2q.train.loop import train_epochs

    torch.manual_seed(0)
    model = build_mlp(**KWARGS)
    train, _ = load_digits()
    train_epochs(model, train, epochs=1, lr=1e-2, progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "mlp.pt"
    save_checkpoint(path, model, "mlp", KWARGS)
    return path, model.eval()


def test_checkpoint_round_trip(checkpoint):
    path, model = checkpoint
    ckpt = load_checkpoint(path)
    assert ckpt.arch == "mlp" and ckpt.dataset == "digits"
    x = load_digits()[1].tensors[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), model(x))
    with pytest.raises(A2QInputError, match="exists"):
        save_checkpoint(path, model, "mlp", KWARGS)


def test_evaluate_json_matches_library(checkpoint, capsys):
    path, model = checkpoint
    code = main(["evaluate", str(path), "--accumulator", "int10-wrap", "fp10-e4m5-c8",
                 "--layer", "fc1=exact", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    _, test = load_digits()
    exact, _ = evaluate_accuracy(model, test)
    assert report["exact_accuracy"] == exact
    assert report["samples"] == len(test)
    by_spec = {r["accumulator"]: r for r in report["results"]}
    for spec in ("int10-wrap", "fp10-e4m5-c8"):
        acc, stats = evaluate_accuracy(model, test, spec, {"fc1": None})
        assert by_spec[spec]["accuracy"] == acc
        assert by_spec[spec]["layers"] == [s.to_dict() for s in stats.layers.values()]
        assert by_spec[spec]["skipped"] == {"fc1": "excluded by override"}
    # the 8-bit input overflows a 10-bit accumulator: the report must show it
    assert by_spec["int10-wrap"]["layers"][0]["overflow_rate"] > 0


def test_evaluate_table(checkpoint, capsys):
    path, _ = checkpoint
    assert main(["evaluate", str(path), "-a", "int16-sat", "--limit", "50"]) == 0
    out = capsys.readouterr().out
    assert "int16-sat" in out and "fc0" in out and "50 samples" in out


def test_evaluate_bad_input(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(junk)]) == 2
    assert f"is not a {CHECKPOINT_FORMAT} checkpoint (not a torch.save archive)" in \
        capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save({"format": "something/2"}, other)
    assert main(["evaluate", str(other)]) == 2
    assert CHECKPOINT_FORMAT in capsys.readouterr().err
    mismatch = tmp_path / "mismatch.pt"
    payload = torch.load(path, weights_only=True)
    payload["model"]["kwargs"] = {**KWARGS, "hidden": (16,)}
    torch.save(payload, mismatch)
    assert main(["evaluate", str(mismatch)]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["evaluate", str(path), "-a", "int12-wrapp"]) == 2
    assert "cannot read accumulator" in capsys.readouterr().err
    assert main(["evaluate", str(path), "--layer", "conv9=int8-wrap"]) == 2
    assert "unknown layer(s) conv9" in capsys.readouterr().err
