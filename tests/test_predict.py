"""kdfast predict (the top classes of a user's images at the checkpoint's views) and evaluate at the views a
checkpoint records, imported ones included."""
import csv
import json
import os
import subprocess
import sys

import pytest

from kdfast import evaluate, import_weights, predict, train
from kdfast.augment import AugmentSpec
from kdfast.config import EvaluateConfig, ImportConfig, PredictConfig, TrainConfig

from .conftest import common, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RRC = AugmentSpec(view="rrc", crop_size=24)


@pytest.fixture(scope="module")
def rrc_run(tmp_path_factory):
    """A resnet8 trained at a RandomResizedCrop view of 24 px on 40 px images, and its folder."""
    root = tmp_path_factory.mktemp("rrc")
    data = {"data": write_image_folder(str(root / "photos"), n_train=12, n_test=6, size=40),
            "cache_dir": str(root / "cache")}
    train.run(TrainConfig(model="resnet8", name="r", epochs=1, augment=RRC, **common(data, root / "m")))
    return root, data


def test_an_imported_rrc_teacher_evaluates_as_its_kdfast_checkpoint(rrc_run):
    root, data = rrc_run
    ours = evaluate.run(EvaluateConfig(checkpoint=str(root / "m" / "r.pth"), cache_dir=data["cache_dir"]))
    import_weights.run(ImportConfig(weights=str(root / "m" / "r.pth"), model="resnet8", data=data["data"],
                                    augment=AugmentSpec.not_given(view="rrc", crop_size=24), out_dir=str(root / "imp"),
                                    name="t", cache_dir=data["cache_dir"]))
    recorded = json.loads((root / "imp" / "t.json").read_text())["config"]
    assert recorded["augment"]["view"] == "rrc" and recorded["augment"]["crop_size"] == 24
    assert recorded["data"] == os.path.abspath(data["data"])
    theirs = evaluate.run(EvaluateConfig(checkpoint=str(root / "imp" / "t.pth"), cache_dir=data["cache_dir"],
                                         precision="fp32"))  # no view flags, no --data
    assert theirs["accuracy"] == ours["accuracy"] and theirs["samples"] == ours["samples"] == 18
    bare = import_weights.run(ImportConfig(weights=str(root / "m" / "r.pth"), model="resnet8", classes=("a", "b", "c"),
                                           out_dir=str(root / "imp"), name="bare"))
    assert AugmentSpec.from_dict(bare["config"]["augment"]).view == "cifar" and "data" not in bare["config"]
    with pytest.raises(ValueError, match="--data: .*imported without --data"):
        evaluate.run(EvaluateConfig(checkpoint=str(root / "imp" / "bare.pth")))


def test_predict_on_a_folder_gives_evaluate_s_top1(rrc_run, tmp_path):
    root, data = rrc_run
    test_dir = os.path.join(data["data"], "test")
    rows = predict.run(PredictConfig(checkpoint=str(root / "m" / "r.pth"), images=(test_dir,), top_k=2,
                                     out=str(tmp_path / "p.csv")))
    assert len(rows) == 18 and all(len(r["top"]) == 2 and r["top"][0][1] >= r["top"][1][1] for r in rows)
    classes = sorted(os.listdir(test_dir))
    truth = [classes.index(os.path.basename(os.path.dirname(r["image"]))) for r in rows]
    correct = sum(classes.index(r["top"][0][0]) == t for r, t in zip(rows, truth))
    result = evaluate.run(EvaluateConfig(checkpoint=str(root / "m" / "r.pth"), cache_dir=data["cache_dir"]))
    assert correct / len(rows) == result["accuracy"]  # the same top-1 on the same images, at the same view
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["image"] for t in table] == [r["image"] for r in rows] and table[0]["class_1"] == rows[0]["top"][0][0]
    one = os.path.join(test_dir, classes[0], "0000.png")
    glob_rows = predict.run(PredictConfig(checkpoint=str(root / "m" / "r.pth"), images=(one, f"{test_dir}/*/0001.png")))
    assert [r["image"] for r in glob_rows][0] == one and len(glob_rows) == 1 + 3
    assert glob_rows[0]["top"][0][0] == rows[0]["top"][0][0]
    assert glob_rows[0]["top"][0][1] == pytest.approx(rows[0]["top"][0][1], abs=1e-5)  # other batches: rounding


def test_predict_names_what_it_cannot_use(rrc_run, tmp_path):
    root, _ = rrc_run
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    for images, says in (((str(tmp_path / "none"),), "no image here"), ((str(tmp_path / "bad.jpg"),), "bad.jpg")):
        done = subprocess.run([sys.executable, "-m", "kdfast.predict", str(root / "m" / "r.pth"), *images], cwd=ROOT,
                              capture_output=True, text=True)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
