"""kdfast table: pairs x methods x seeds through the sweep's machinery, the published column, resuming."""
import io
import json
import os
import tarfile

import pytest

from kdfast import distill, table
from kdfast.config import TableConfig

from .conftest import SHARED_DATA, write_image_folder
from .test_ecosystem import point_torchvision_at, tiny_torchvision_archive


def write_torchvision_cifar100(root, monkeypatch, per_class: int) -> str:
    """A folder in torchvision's CIFAR-100 layout (cifar-100-python/train, test, meta) of 100 classes, per_class
    training images and one test image a class; torchvision told its files' MD5 sums."""
    archive, sums = tiny_torchvision_archive("cifar100", 100, per_class)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    point_torchvision_at(monkeypatch, "cifar100", "http://127.0.0.1:9/unused.tar.gz", archive, sums)
    return str(root)


def small(tmp_path, **kw) -> TableConfig:
    base = dict(out_dir=str(tmp_path / "table"), cache_dir=str(tmp_path / "cache"), epochs=1, seeds=2, batch_size=16,
                eval_batch_size=100, precision="fp32", progress=False)
    return TableConfig(**{**base, **kw})


def test_a_cifar100_table_has_seeds_the_validation_choice_and_the_published_numbers(tmp_path, monkeypatch):
    data = write_torchvision_cifar100(tmp_path / "c100", monkeypatch, per_class=3)
    cfg = small(tmp_path, data=data, dataset="cifar100", val_per_class=1, pairs=("resnet56:resnet20",),
                methods=("kd", "kd+ls"), taus=(2.0, 4.0))
    rows = table.run(cfg)["rows"]
    assert [r["method"] for r in rows] == ["teacher", "ce", "kd", "kd+ls"]
    by = {r["method"]: r for r in rows}
    assert by["teacher"]["published"] == 72.34 and by["ce"]["published"] == 69.06 and by["kd"]["published"] == 70.66
    assert by["kd+ls"]["published"] is None  # the tables have no KD+LS number for this pair
    assert all(by[m]["seeds"] == 2 and len(by[m]["accuracies"]) == 2 for m in ("ce", "kd", "kd+ls"))
    assert by["kd"]["point"]["chosen_on"] == "validation" and by["kd"]["point"]["tau"] in (2.0, 4.0)
    assert by["kd"]["gain"] == pytest.approx(by["kd"]["mean"] - by["ce"]["mean"])
    out = tmp_path / "table"
    md = (out / "table.md").read_text()
    assert "| resnet56 → resnet20 | kd |" in md and "70.66" in md and "(validation)" in md and "RepDistiller" in md
    assert "compare the gains" in md  # one epoch is not the published 240
    saved = json.loads((out / "table.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["teacher", "ce", "kd", "kd+ls"]
    assert (out / "table.csv").read_text().splitlines()[0].startswith("pair,method,seeds,mean,std,gain")
    assert (out / "caches" / "resnet56.h5").exists() and (out / "teachers" / "resnet56.pth").exists()


@pytest.mark.skipif(not os.path.exists(SHARED_DATA), reason="needs the offline CIFAR-10 copy")
def test_a_table_on_cifar10_continues_after_an_interruption_keeping_finished_cells(tmp_path, monkeypatch, capsys):
    cfg = small(tmp_path, data=SHARED_DATA, train_per_class=10, test_per_class=5, val_per_class=2,
                pairs=("resnet20:resnet8",), methods=("kd", "dkd"), best_epoch=True)
    real, calls = distill.run, []

    def interrupted(run_cfg, *a, **kw):  # Ctrl-C as the third KD student starts
        calls.append(run_cfg.run_name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(run_cfg, *a, **kw)

    monkeypatch.setattr(distill, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        table.run(cfg)
    folder = tmp_path / "table" / "resnet20-resnet8"
    first = {n: json.loads((folder / f"{n}.json").read_text())["test_accuracy"]
             for n in ("nokd-s0", "nokd-s1", "kd-a0.1-t4-s0", "kd-a0.1-t4-s1")}
    monkeypatch.setattr(distill, "run", real)
    capsys.readouterr()
    rows = table.run(cfg)["rows"]
    said = capsys.readouterr().out
    assert "kd-a0.1-t4-s1: " in said and "finished earlier, kept" in said
    assert "[resnet20] epoch 1/1" not in said  # the teacher is kept
    by = {r["method"]: r for r in rows}
    assert sorted(by["kd"]["accuracies"]) == sorted([first["kd-a0.1-t4-s0"], first["kd-a0.1-t4-s1"]])
    assert sorted(by["ce"]["accuracies"]) == sorted([first["nokd-s0"], first["nokd-s1"]])
    assert by["dkd"]["seeds"] == 2 and by["dkd"]["published"] is None  # not a published pair
    assert "best epoch (chosen on validation)" in (tmp_path / "table" / "table.md").read_text()
    assert all(0.0 <= by[m]["best_epoch_mean"] <= 1.0 for m in ("ce", "kd", "dkd"))


@pytest.mark.parametrize("flags,message", [
    (dict(pairs=("resnet56",)), "--pairs"),
    (dict(pairs=("resnet56:resnet_20",)), "--pairs resnet56:resnet_20: unknown model"),
    (dict(methods=("fitnets",)), "--methods fitnets"),
    (dict(methods=("kd+xx",)), "--methods kd\\+xx"),
    (dict(methods=("kd", "kd")), "--methods"),
])
def test_bad_pairs_and_methods_are_named(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        table.run(small(tmp_path, **flags))


def test_an_ensemble_pair_reuses_the_teachers_caches_and_the_students_alone(tmp_path, capsys):
    data = write_image_folder(str(tmp_path / "data"))
    cfg = small(tmp_path, data=data, seeds=1, batch_size=6, eval_batch_size=5, methods=("kd",),
                pairs=("resnet8:resnet8", "resnet20:resnet8", "resnet8+resnet20:resnet8"))
    rows = table.run(cfg)["rows"]
    said = capsys.readouterr().out
    assert said.count("[resnet8] epoch 1/1") == 1  # each teacher trained once
    assert said.count("[nokd-s0] epoch 1/1") == 1  # the student alone once, then copied into the other pairs' folders
    assert "teacher resnet8: " in said and "finished earlier with this config: kept" in said
    ensemble = [r for r in rows if r["pair"] == "resnet8+resnet20:resnet8"]
    assert [r["method"] for r in ensemble] == ["teacher", "ce", "kd"]
    copied = json.loads((tmp_path / "table" / "resnet8+resnet20-resnet8" / "nokd-s0.json").read_text())
    assert copied["copied_from"].endswith(os.path.join("resnet8-resnet8", "nokd-s0.json"))
    kd = json.loads((tmp_path / "table" / "resnet8+resnet20-resnet8" / "kd-a0.1-t4-s0.json").read_text())["kd"]
    assert kd["teacher_model"] == "resnet8 + resnet20"
    assert len(kd["ensemble"]["teacher_accuracies"]) == 2
