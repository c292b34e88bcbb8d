"""End to end: the real lab pipeline at smoke size on data the test makes, and resuming."""
import dataclasses
import json
import os
import shlex

import pytest
import torch
from safetensors.torch import load_file

from kdfast import cli, distill, evaluate, lab, labreport, train
from kdfast.config import LAB_PRESETS, DistillConfig, EvaluateConfig, LabConfig, TrainConfig
from kdfast.errors import KdfastError
from kdfast.rundir import StateError

from .test_runs import one_line_error

NAMES = [f"{p}_{r}" for p in ("cnn", "vit") for r in ("teacher", "student_no_kd", "student_with_kd")]


def tiny_lab(tmp_path, data) -> LabConfig:
    return LabConfig(preset="smoke", data=data, cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "models_saved"),
                     report=str(tmp_path / "report.json"), cnn_teacher_epochs=2, cnn_student_epochs=1,
                     vit_teacher_epochs=1, vit_student_epochs=1, cnn_batch_size=8, vit_batch_size=8,
                     eval_batch_size=5, precision="fp32", progress=False, alpha=0.3, tau=2.0)


def test_smoke_lab_end_to_end(tmp_path, image_folder, monkeypatch):
    cfg = tiny_lab(tmp_path, image_folder)
    report = lab.run(cfg)

    with open(cfg.report) as f:
        assert json.load(f) == report
    assert set(report) == {"cnn", "vit"}
    for pair in ("cnn", "vit"):
        keys = {"teacher_accuracy", "student_accuracy_without_kd", "student_accuracy_with_kd"}
        assert set(report[pair]) == keys | {"details"}
        assert all(0.0 <= report[pair][k] <= 1.0 for k in keys)
        kd = report[pair]["details"]["student_with_kd"]
        assert (kd["alpha"], kd["tau"], kd["kd_mode"], kd["preset"]) == (0.3, 2.0, "cached", "smoke")
        assert report[pair]["details"]["teacher"]["train_size"] == 24

    for name in NAMES:
        base = os.path.join(cfg.out_dir, name)
        state = torch.load(base + ".pth", weights_only=True)
        tensors = load_file(base + ".safetensors")
        assert state.keys() == tensors.keys() and all(torch.equal(state[k], tensors[k]) for k in state)
        meta = json.load(open(base + ".json"))
        assert meta["classes"] == ["cat", "dog", "frog"] and meta["precision"] == "fp32"
        lines = [json.loads(l) for l in open(base + ".metrics.jsonl")]
        assert [l["epoch"] for l in lines] == list(range(meta["epochs"]))
        assert {"train_loss", "train_accuracy", "test_accuracy", "img_per_s", "lr", "precision"} <= set(lines[-1])
        # reloaded by kdfast.evaluate, each checkpoint reproduces its reported accuracy exactly
        result = evaluate.run(EvaluateConfig(checkpoint=base + ".pth", cache_dir=cfg.cache_dir))
        assert result["accuracy"] == meta["test_accuracy"]
    assert not os.path.exists(os.path.join(cfg.out_dir, ".state", "cnn_teacher"))  # finished runs leave no state

    # report.md beside report.json names every run and shows the curves; `kdfast report` rebuilds both
    md_path = tmp_path / "report.md"
    md = md_path.read_text()
    assert all(f"| {name} |" in md for name in NAMES)
    for pair in ("cnn", "vit"):
        assert f"report_{pair}_curves.png" in md and (tmp_path / f"report_{pair}_curves.png").stat().st_size > 1000
    md_path.unlink()
    from kdfast import labreport

    labreport.run(labreport.ReportConfig(out_dir=cfg.out_dir, report=cfg.report))
    with open(cfg.report) as f:
        assert json.load(f) == report
    assert all(f"| {name} |" in md_path.read_text() for name in NAMES)

    check_report_page(tmp_path, cfg, md_path.read_text())

    # the report's "how to reproduce" commands work: the lab's, run again, keeps every finished run (it is this lab);
    # the report's and evaluate's run as they are
    commands = reproduce_commands(md_path.read_text())
    assert [c[:2] for c in commands] == [["kdfast", "lab"], ["kdfast", "report"], ["kdfast", "evaluate"]]
    assert cli.run(commands[2][1:]) == 0
    assert cli.run(commands[1][1:]) == 0 and json.load(open(cfg.report)) == report
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("retrained a finished run"))
    monkeypatch.setattr(distill, "run", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert lab.run(lab.parse(commands[0][2:])) == report


def reproduce_commands(md: str) -> list[list[str]]:
    block = md.split("## How to reproduce")[1].split("```bash\n")[1].split("```")[0]
    return [shlex.split(line.split("   #")[0]) for line in block.strip().splitlines()]


def check_report_page(folder, cfg, md: str) -> None:
    """What report.md must show: model names and sizes, the data's sizes and chance, what the test set resolves,
    per-class accuracy and confusion matrices, statements only as far as the numbers go; the figures' axes."""
    assert "24 training images, 12 test images" in md and "Chance accuracy (guessing): 0.3333" in md
    assert "What the test set resolves" in md and "## What the numbers show" in md
    assert "| cnn_teacher | resnet18 | 11.2M |" in md and "| vit_student_no_kd | vit_student |" in md
    assert "fewer than 10,000 images or for fewer than 10 epochs" in md  # a smoke lab is said to be one
    for pair in ("cnn", "vit"):
        assert f"## {pair}: per-class test accuracy and confusion matrices" in md
        assert (folder / f"report_{pair}_confusion.png").stat().st_size > 1000
        labels = labreport.curves(cfg.out_dir, labreport.saved_results(cfg.out_dir), pair)
        assert any(label.startswith("teacher: ") and "params)" in label for label in labels)
    assert md.count("| cat |") == 2 and "| class | teacher | student, no KD | student, KD |" in md
    for line in md.split("## What the numbers show")[1].split("##")[0].splitlines():
        if " against " in line:  # 12 test images resolve nothing this tiny lab could show
            assert "so no difference is shown" in line or "beyond what 12 test images resolve" in line, line


def test_lab_learns_on_easy_data(tmp_path, image_folder):
    """Colour tells the class apart: a few epochs of the CNN pair must beat chance by far."""
    cfg = tiny_lab(tmp_path, image_folder)
    cfg.pairs, cfg.cnn_teacher_epochs, cfg.cnn_student_epochs, cfg.cnn_batch_size = ("cnn",), 4, 6, 6
    report = lab.run(cfg)
    assert report["cnn"]["teacher_accuracy"] >= 0.75
    assert report["cnn"]["student_accuracy_with_kd"] >= 0.75


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, image_folder, monkeypatch):
    common = dict(model="resnet8", data=image_folder, cache_dir=str(tmp_path / "cache"), epochs=3, batch_size=6,
                  eval_batch_size=5, precision="fp32", progress=False)
    whole = train.run(TrainConfig(name="whole", out_dir=str(tmp_path / "a"), **common))

    from kdfast import data as data_mod

    original_epoch = data_mod.TrainLoader.epoch

    def epoch_that_dies(self, epoch, aug_seed, start_step=0):
        if epoch == 2:
            raise Interrupt("killed during epoch 3")
        yield from original_epoch(self, epoch, aug_seed, start_step)

    cfg = TrainConfig(name="whole", out_dir=str(tmp_path / "b"), resume=True, **common)
    monkeypatch.setattr(data_mod.TrainLoader, "epoch", epoch_that_dies)
    with pytest.raises(Interrupt):
        train.run(cfg)
    assert os.path.exists(os.path.join(cfg.out_dir, ".state", "whole", "state.json"))
    monkeypatch.setattr(data_mod.TrainLoader, "epoch", original_epoch)
    resumed = train.run(cfg)

    a = torch.load(tmp_path / "a" / "whole.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "whole.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert [json.loads(l)["epoch"] for l in open(tmp_path / "b" / "whole.metrics.jsonl")] == [0, 1, 2]


def test_distill_refuses_bad_kd_params_before_work(tmp_path):
    with pytest.raises(ValueError, match="--alpha must be"):
        distill.run(DistillConfig(alpha=2.0, data=str(tmp_path / "missing"), teacher="t.pth"))
    with pytest.raises(ValueError, match="--tau must be"):
        distill.run(DistillConfig(tau=0.0, data=str(tmp_path / "missing"), teacher="t.pth"))


def test_distill_names_a_missing_teacher(tmp_path, image_folder):
    cfg = DistillConfig(teacher=str(tmp_path / "nope.pth"), data=image_folder, cache_dir=str(tmp_path / "c"),
                        out_dir=str(tmp_path / "o"), epochs=1, batch_size=6, progress=False, precision="fp32")
    with pytest.raises(FileNotFoundError, match="nope.pth: checkpoint not found"):
        distill.run(cfg)


def test_lab_with_a_sweep_puts_it_in_report_md(tmp_path, image_folder):
    from dataclasses import replace

    cfg = replace(tiny_lab(tmp_path, image_folder), pairs=("cnn",), sweep_alphas=(0.2, 0.8), sweep_taus=(2.0,),
                  sweep_seeds=2)
    lab.run(cfg)
    sweep_dir = tmp_path / "models_saved" / "sweep_cnn"
    with open(sweep_dir / "sweep.json") as f:
        runs = json.load(f)["runs"]
    assert sorted(r["name"] for r in runs) == sorted(["nokd-s0", "nokd-s1", "kd-a0.2-t2-s0", "kd-a0.8-t2-s0",
                                                      "kd-a0.2-t2-s1", "kd-a0.8-t2-s1"])
    md = (tmp_path / "report.md").read_text()
    assert "## Sweep: cnn" in md and "models_saved/sweep_cnn/sweep_heatmap.png" in md
    assert (sweep_dir / "sweep_heatmap.png").exists()
    for r in runs:  # each row is its run's last metrics line
        with open(sweep_dir / f"{r['name']}.metrics.jsonl") as f:
            assert r["test_accuracy"] == [json.loads(line) for line in f][-1]["test_accuracy"]
    with pytest.raises(ValueError, match="--sweep-taus"):
        lab.run(replace(cfg, sweep_taus=()))
    with pytest.raises(ValueError, match="--online"):
        lab.run(replace(cfg, online=True))


def test_lab_sweep_copies_the_labs_own_students_and_they_equal_trained_points(tmp_path, image_folder, monkeypatch,
                                                                              capsys):
    """The lab's no-KD and KD students (seed 0, the lab's alpha and tau) are sweep points: copied, not retrained,
    and the copies equal what training those points gives."""
    import shutil
    from dataclasses import replace

    from kdfast import sweep

    cfg = replace(tiny_lab(tmp_path, image_folder), pairs=("cnn",), sweep_alphas=(0.3, 0.8), sweep_taus=(2.0,),
                  sweep_seeds=2)
    lab.run(cfg)
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "models_saved" / "sweep_cnn"
    copies = {"nokd-s0": "cnn_student_no_kd", "kd-a0.3-t2-s0": "cnn_student_with_kd"}
    for point in ("nokd-s0", "nokd-s1", "kd-a0.3-t2-s0", "kd-a0.8-t2-s0", "kd-a0.3-t2-s1", "kd-a0.8-t2-s1"):
        meta = json.load(open(sweep_dir / f"{point}.json"))
        copied = point in copies
        assert ("copied_from" in meta) == copied and (f"[sweep] {point}: the same run as" in out) == copied
        assert (f"[{point}] resnet8" in out) != copied  # trained: its header line
        if copied:
            assert meta["copied_from"] == os.path.join(cfg.out_dir, copies[point] + ".json")
            assert meta["config"]["name"] == point and meta["test_accuracy"] == json.load(
                open(os.path.join(cfg.out_dir, copies[point] + ".json")))["test_accuracy"]
    shutil.move(sweep_dir, tmp_path / "copied")
    monkeypatch.setattr(sweep, "adopt_finished_run", lambda *a: None)  # the same lab, its sweep trains every point
    lab.run(cfg)
    assert "the same run as" not in capsys.readouterr().out
    for point in copies:
        trained, copy = (load_file(d / f"{point}.safetensors") for d in (sweep_dir, tmp_path / "copied"))
        assert trained.keys() == copy.keys() and all(torch.equal(trained[k], copy[k]) for k in trained)


def test_the_smoke_lab_leaves_the_repository_deliverables_alone(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.json").write_text('{"cnn": "the measured results"}')
    cfg = dataclasses.replace(LAB_PRESETS["smoke"], data=tiny_data["data"], pairs=("cnn",), cnn_teacher_epochs=1,
                              cnn_student_epochs=1, cnn_batch_size=6, eval_batch_size=5, precision="fp32",
                              progress=False)
    lab.run(cfg)
    assert "[lab] cnn_teacher: training (no finished run of it yet)" in capsys.readouterr().out
    with pytest.raises(StateError, match=r"(?s)cnn_teacher.json: a finished run.*epochs: it has 1, this run 2.*--fresh"):
        lab.run(dataclasses.replace(cfg, cnn_teacher_epochs=2))  # a lab over finished runs of another config
    assert "another config (below): refused unless --fresh" in capsys.readouterr().out
    assert (tmp_path / "report.json").read_text() == '{"cnn": "the measured results"}'
    assert not (tmp_path / "models_saved").exists() and not (tmp_path / "report.md").exists()
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "cache").exists()
    assert json.load(open(tmp_path / "runs" / "smoke" / "report.json"))["cnn"]["teacher_accuracy"] >= 0
    from kdfast import labreport  # rebuilt into a folder that does not exist yet, without a lab's header

    md = labreport.run(labreport.ReportConfig(out_dir="runs/smoke/models_saved", report=str(tmp_path / "new" / "r.json")))
    assert "None" not in open(md).read().splitlines()[2]


def test_labs_of_two_pairs_merge_into_one_report(tmp_path):
    lab.write_merged(str(tmp_path / "report.json"), {"cnn": {"teacher_accuracy": 0.9, "details": {}}})
    merged = lab.write_merged(str(tmp_path / "report.json"), {"vit": {"teacher_accuracy": 0.8, "details": {}}})
    assert set(merged) == {"cnn", "vit"} and json.load(open(tmp_path / "report.json")) == merged


def test_report_with_a_sweep_folder_that_holds_none_is_refused(tmp_path):
    with pytest.raises(KdfastError, match="--sweep .*: no sweep here"):
        labreport.run(labreport.ReportConfig(out_dir=str(tmp_path), sweep=str(tmp_path / "typo")))


def test_a_lab_checks_every_run_before_the_first_one_trains(tmp_path, image_folder, capsys):
    """A mistake in the second pair (its batch larger than the data) stops the lab before the first pair trains."""
    err = one_line_error(capsys, lab.main, ["--preset", "smoke", "--data", image_folder, "--cache-dir",
                                            str(tmp_path / "c"), "--out-dir", str(tmp_path / "m"), "--report",
                                            str(tmp_path / "report.json"), "--cnn-batch-size", "6", "--vit-batch-size",
                                            "100", "--no-progress"])
    assert "--vit-batch-size 100 is larger than the training set (24 samples)" in err
    assert not os.path.exists(tmp_path / "m" / "cnn_teacher.pth")


def test_report_writes_beside_the_runs_and_never_over_a_report_of_other_runs(tmp_path, image_folder, monkeypatch,
                                                                            capsys):
    cfg = dataclasses.replace(tiny_lab(tmp_path, image_folder), pairs=("cnn",), vit_teacher_epochs=1)
    lab.run(cfg)
    monkeypatch.chdir(tmp_path)
    committed = json.dumps({"cnn": {"teacher_accuracy": 0.9106, "details": {"teacher": {
        "model": "resnet18", "data_fingerprint": "ed64221fec3ef2ef", "seed": 0, "epochs": 60, "wall_time_s": 143.1}}}})
    (tmp_path / "report.json").write_text(committed)  # a repository's measured results, in the working folder
    labreport.main(["models_saved"])
    assert (tmp_path / "report.json").read_text() == committed  # untouched: written beside the runs
    assert "wrote models_saved/report.json and models_saved/report.md" in capsys.readouterr().out
    beside = json.load(open(tmp_path / "models_saved" / "report.json"))
    assert beside["cnn"]["details"]["teacher"]["data_source"] == os.path.relpath(image_folder)  # no machine path
    err = one_line_error(capsys, labreport.main, ["models_saved", "--report", "report.json"])
    assert "--report report.json holds the report of other runs (its cnn teacher is model resnet18" in err
    assert "--overwrite" in err and (tmp_path / "report.json").read_text() == committed
    labreport.main(["models_saved", "--report", "models_saved/report.json"])  # the same runs: rebuilt
    labreport.main(["models_saved", "--report", "report.json", "--overwrite"])
    assert json.load(open(tmp_path / "report.json")) == beside


def test_report_over_any_folder_of_runs_tables_them_with_their_differences(tiny_data, tmp_path, capsys):
    from .conftest import common

    for name, lr in (("a", 0.05), ("b", 0.1)):
        train.run(TrainConfig(model="resnet8", name=name, epochs=1, lr=lr, **common(tiny_data, tmp_path / "runs")))
    md = labreport.run(labreport.ReportConfig(out_dir=str(tmp_path / "runs")))
    text = open(md).read()
    assert md == str(tmp_path / "runs" / "report.md") and not (tmp_path / "runs" / "report.json").exists()
    assert "| a | resnet8 | 78k | 1 |" in text and "| b | resnet8 | 78k | 1 |" in text
    assert "| run | lr |" in text and "| a | 0.05 |" in text and "| b | 0.1 |" in text  # what differs, and only that
    labreport.run(labreport.ReportConfig(out_dir=str(tmp_path / "runs")))  # its own report: rebuilt
    (tmp_path / "mine.md").write_text("my notes")
    with pytest.raises(KdfastError, match="mine.md exists and is not a report of the runs"):
        labreport.run(labreport.ReportConfig(out_dir=str(tmp_path / "runs"), report=str(tmp_path / "mine.json")))
    assert (tmp_path / "mine.md").read_text() == "my notes"
    with pytest.raises(KdfastError, match="no finished runs here"):
        labreport.run(labreport.ReportConfig(out_dir=str(tmp_path / "empty")))


def test_lab_seeds_train_the_students_again_and_the_report_compares_their_means(tmp_path, image_folder):
    cfg = dataclasses.replace(tiny_lab(tmp_path, image_folder), pairs=("cnn",), seeds=2)
    report = lab.run(cfg)
    seeds_dir = tmp_path / "models_saved" / "seeds"
    assert sorted(p.name for p in seeds_dir.glob("*.json")) == ["cnn_student_no_kd-s1.json",
                                                                 "cnn_student_with_kd-s1.json"]
    assert json.load(open(seeds_dir / "cnn_student_no_kd-s1.json"))["seed"] == 1
    details = report["cnn"]["details"]
    for role, key in (("student_no_kd", "student_accuracy_without_kd"), ("student_with_kd", "student_accuracy_with_kd")):
        accs = details[role]["seeds"]["accuracies"]
        assert len(accs) == 2 and accs[0] == report["cnn"][key]  # report.json's accuracy: --seed's
        assert details[role]["seeds"]["spread"] == round(max(accs) - min(accs), 4)
    assert "methods" not in details  # the seeds' runs are not extra methods
    md = (tmp_path / "report.md").read_text()
    assert "student, KD (resnet8), mean of 2 seeds" in md and "| cnn_student_with_kd-s1 |" in md
    os.unlink(cfg.report)
    labreport.run(labreport.ReportConfig(out_dir=cfg.out_dir, report=cfg.report))  # rebuilt from the saved runs
    assert json.load(open(cfg.report))["cnn"]["details"]["student_no_kd"]["seeds"] == details["student_no_kd"]["seeds"]
