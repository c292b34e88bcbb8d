"""kdfast import: any file that is not model weights refused in one line, and nothing written over without
--overwrite (the weights file being imported least of all)."""
import os

import pytest
import torch

from kdfast import import_weights
from kdfast.models import create_model

from .test_runs import one_line_error


@pytest.fixture
def weights(tmp_path):
    return create_model("timm:test_resnet", num_classes=3).state_dict()


def run_import(capsys, path, *extra):
    return one_line_error(capsys, import_weights.main, [str(path), "--model", "timm:test_resnet", "--classes", "cat",
                                                        "dog", "frog", *extra])


@pytest.mark.parametrize("content, said", [
    ([1, 2, 3], "holds a list, not a state dict"),
    ({1: torch.zeros(2)}, "holds a dict of 1 entries (1; values: Tensor), not a state dict"),
    ({"epoch": 3, "net": {"a": torch.zeros(1)}}, "holds a dict of 2 entries ('epoch', 'net'; values: dict, int)"),
    ({}, "holds an empty dict, not a state dict"),
])
def test_a_file_that_is_not_a_state_dict_is_refused_in_one_line(tmp_path, capsys, content, said):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    err = run_import(capsys, path, "--out-dir", str(tmp_path / "m"))
    assert f"{path}: {said}" in err and "torch.save(model.state_dict(), FILE)" in err
    assert not os.path.exists(tmp_path / "m" / "odd.pth")


def test_an_import_onto_its_own_input_is_refused_without_overwrite(tmp_path, capsys, weights):
    path = tmp_path / "teacher.pth"
    torch.save({"model": weights, "optimizer": {"lr": torch.tensor(0.1)}, "epoch": torch.tensor(7)}, path)
    before = path.read_bytes()
    err = run_import(capsys, path, "--out-dir", str(tmp_path))  # the input's folder: the output would be the input
    assert f"{path}: the import would write over the weights file it reads" in err and "--overwrite" in err
    assert path.read_bytes() == before
    import_weights.main([str(path), "--model", "timm:test_resnet", "--classes", "cat", "dog", "frog", "--out-dir",
                         str(tmp_path), "--overwrite"])  # asked for: replaced by the plain checkpoint
    assert set(torch.load(path, weights_only=True)) == set(weights)
    other = tmp_path / "elsewhere"
    os.makedirs(other)
    torch.save(weights, other / "teacher.pth")
    err = run_import(capsys, other / "teacher.pth", "--out-dir", str(tmp_path))  # another file of that name
    assert "a checkpoint of this name exists" in err
