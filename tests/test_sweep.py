"""kdfast sweep: an alpha x tau grid from one cache, resumable after a killed process; its table equals the runs'
metrics; the no-KD baseline and the teacher warning."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tyro

from kdfast import cache as cache_mod
from kdfast import engine, sweep, train
from kdfast.cache import BuildConfig, LogitCache
from kdfast.config import SweepConfig, TrainConfig
from kdfast.errors import Interrupted
from kdfast.report import lab_report

from .conftest import common, sweep_cfg, teacher_and_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return teacher_and_cache(root, teacher_epochs=2, data=str(root / "tiny"), batch_size=7)


def sweep_args(cache_path, common, out):
    return ["--teacher-cache", cache_path, "--model", "resnet8", "--alphas", "0.3", "0.7", "--taus", "2", "--seeds",
            "2", "--epochs", "2", "--batch-size", "6", "--eval-batch-size", "5", "--precision", "fp32",
            "--cache-dir", common["cache_dir"], "--out-dir", str(out), "--no-progress"]


def test_sweep_killed_resumes_without_redoing_finished_points(cache, tmp_path):
    cache_path, common = cache
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kdfast.sweep", *sweep_args(cache_path, common, out)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "kd-a0.3-t2-s0.json"
    t0 = time.time()
    while not first.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 180
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out) if p.endswith(".json") and p != "sweep.json"}
    assert "nokd-s0.json" in finished and "kd-a0.3-t2-s0.json" in finished
    cfg = tyro.cli(SweepConfig, args=sweep_args(cache_path, common, out))
    result = sweep.run(cfg)
    for name, mtime in finished.items():  # kept, not redone
        assert os.stat(out / name).st_mtime_ns == mtime, name
    rows = result["runs"]
    assert len(rows) == 2 * (1 + 2)
    for row in rows:  # the table's numbers are the runs' metrics files, last epoch
        last = [json.loads(l) for l in open(out / f"{row['name']}.metrics.jsonl")][-1]
        assert row["test_accuracy"] == last["test_accuracy"] and last["epoch"] == 1
    with open(out / "sweep.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == [r["name"] for r in rows]
    md = (out / "sweep.md").read_text()
    assert "| point | validation | test (mean ± std) |" in md and "no KD:" in md and "◀ chosen" in md
    assert "![alpha x tau](sweep_heatmap.png)" in md and (out / "sweep_heatmap.png").stat().st_size > 1000
    best = result["summary"]["best"]
    assert f"{best['mean']:.4f}" in md


def test_summary_mean_spread_best_and_gain():
    rows = [{"kind": "no_kd", "alpha": None, "tau": None, "seed": s, "test_accuracy": a} for s, a in ((0, 0.60), (1, 0.62))]
    rows += [{"kind": "kd", "alpha": 0.5, "tau": 4.0, "seed": s, "test_accuracy": a} for s, a in ((0, 0.70), (1, 0.66))]
    rows += [{"kind": "kd", "alpha": 0.9, "tau": 4.0, "seed": s, "test_accuracy": a} for s, a in ((0, 0.63), (1, 0.63))]
    s = sweep.summarize(rows, teacher_accuracy=0.8)
    assert s["best"]["alpha"] == 0.5 and s["best"]["mean"] == pytest.approx(0.68)
    assert s["best"]["spread"] == pytest.approx(0.04) and s["no_kd"]["spread"] == pytest.approx(0.02)
    assert s["gain_over_no_kd"] == pytest.approx(0.07) and s["gain_beyond_spread"] and not s["warnings"]
    assert sweep.summarize(rows, teacher_accuracy=0.6)["warnings"]  # teacher no better than no KD
    one_seed = sweep.summarize([r for r in rows if r["seed"] == 0], teacher_accuracy=0.8)
    assert one_seed["gain_over_no_kd"] == pytest.approx(0.10) and one_seed["gain_beyond_spread"] is None
    cfg = SweepConfig(pair="cnn", alphas=(0.5, 0.9), taus=(4.0,), seeds=1, epochs=1)
    assert "no spread to compare" in sweep.markdown(cfg, one_seed) and "beyond" not in sweep.markdown(cfg, one_seed)


def test_lab_report_warns_when_the_teacher_is_not_better():
    def meta(acc):
        return {"model": "m", "parameters": 1, "epochs": 1, "seed": 0, "device": "cpu", "num_processes": 1,
                "precision": "fp32", "wall_time_s": 1.0, "train_img_per_s": 1.0, "test_accuracy": acc,
                "data": {"source": "s", "fingerprint": "f", "train_size": 1, "test_size": 1}}

    report = lab_report({"cnn_teacher": meta(0.5), "cnn_student_no_kd": meta(0.6)}, {})
    assert "not more accurate" in report["cnn"]["details"]["warning"]
    report = lab_report({"cnn_teacher": meta(0.7), "cnn_student_no_kd": meta(0.6)}, {})
    assert "warning" not in report["cnn"]["details"]


def test_sweep_refuses_feature_methods_and_bad_grids(cache, tmp_path):
    cache_path, _ = cache
    with pytest.raises(ValueError, match="logit method"):
        sweep.run(SweepConfig(teacher_cache=cache_path, method="fitnets", out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="--alphas"):
        sweep.run(SweepConfig(teacher_cache=cache_path, alphas=(1.5,), out_dir=str(tmp_path)))


def test_the_sweep_chooses_its_best_point_on_validation_and_reports_its_test_accuracy():
    rows = [{"kind": "kd", "alpha": a, "tau": 4.0, "slots": 0, "seed": s, "val_accuracy": v, "test_accuracy": t}
            for a, v, t in ((0.1, 0.6, 0.5), (0.9, 0.5, 0.7)) for s in (0, 1)]
    summary = sweep.summarize(rows, None)
    assert summary["chosen_on"] == "validation" and summary["best"]["alpha"] == 0.1  # not the test set's 0.9
    assert summary["best"]["mean"] == 0.5
    without = sweep.summarize([{k: v for k, v in r.items() if k != "val_accuracy"} for r in rows], None)
    assert without["chosen_on"] == "test" and without["best"]["alpha"] == 0.9


def test_a_sweep_from_a_cache_with_a_validation_split_uses_it(tiny_data, tmp_path):
    teacher = train.run(TrainConfig(model="resnet8", name="teacher", epochs=1, val_per_class=3, train_per_class=6,
                                    **common(tiny_data, tmp_path / "m")))
    assert teacher["data"]["train_size"] == 18
    h5 = cache_mod.build(BuildConfig(teacher=str(tmp_path / "m" / "teacher.pth"), out=str(tmp_path / "t.h5"),
                                     slots=1, cache_dir=tiny_data["cache_dir"], precision="fp32",
                                     progress=False))  # no data flags
    attrs = LogitCache(h5).attrs
    assert (attrs["train_size"], attrs["val_per_class"], attrs["train_per_class"]) == (18, 3, 6)
    checked = cache_mod.verify(cache_mod.VerifyConfig(file=h5, teacher=str(tmp_path / "m" / "teacher.pth"),
                                                      samples=8, cache_dir=tiny_data["cache_dir"]))  # as built
    assert checked["argmax_agreement"] == 1.0
    result = sweep.run(SweepConfig(teacher_cache=h5, model="resnet8", alphas=(0.3, 0.7), taus=(2.0,), seeds=1,
                                   epochs=1, batch_size=6, eval_batch_size=5, precision="fp32", progress=False,
                                   out_dir=str(tmp_path / "sweep"), cache_dir=tiny_data["cache_dir"]))
    assert result["summary"]["chosen_on"] == "validation"
    assert all("val_accuracy" in r for r in result["runs"])
    assert "the highest validation accuracy" in open(tmp_path / "sweep" / "sweep.md").read()


def test_the_sweep_table_and_heatmap_mark_the_chosen_point_and_say_when_none_beats_no_kd(tmp_path, monkeypatch):
    rows = [{"kind": "no_kd", "alpha": None, "tau": None, "slots": 0, "seed": s, "val_accuracy": 0.55,
             "test_accuracy": 0.6} for s in (0, 1)]
    rows += [{"kind": "kd", "alpha": a, "tau": 2.0, "slots": 0, "seed": s, "val_accuracy": v, "test_accuracy": t}
             for a, v, t in ((0.1, 0.6, 0.5), (0.9, 0.5, 0.7)) for s in (0, 1)]
    cfg = SweepConfig(pair="cnn", alphas=(0.1, 0.9), taus=(2.0,), seeds=2, epochs=1, out_dir=str(tmp_path))
    summary = sweep.summarize(rows, None)
    md = sweep.markdown(cfg, summary)
    chosen = [line for line in md.splitlines() if "◀ chosen" in line]
    assert chosen == ["| **α 0.1, τ 2** | 0.6000 | 0.5000 ± 0.0000 | -0.1000 | **◀ chosen** |"]  # not test's 0.9
    assert "| α 0.9, τ 2 | 0.5000 | 0.7000 ± 0.0000 | +0.1000 |  |" in md
    assert "the highest validation accuracy; the test split is never used to choose" in md
    assert "no point beats no KD" not in md
    drawn = {}
    monkeypatch.setattr(sweep.plots, "sweep_heatmap", lambda *a, **k: drawn.update(args=a, **k))
    sweep.write_results(cfg, rows, summary)
    assert drawn["chosen"] == (0.1, 2.0) and drawn["label"] == "validation accuracy"
    assert drawn["args"][2] == {(0.1, 2.0): 0.6, (0.9, 2.0): 0.5} and drawn["args"][3] == 0.55  # validation, both
    worse = [{**r, "val_accuracy": 0.4} if r["kind"] != "no_kd" else r for r in rows]
    md = sweep.markdown(cfg, sweep.summarize(worse, None))
    assert "no point beats no KD on validation accuracy: no KD 0.5500, the highest point (alpha 0.1, tau 2) 0.4000" in md
    assert "chosen:" not in md


def test_the_heatmap_boxes_the_chosen_cell(tmp_path):
    from kdfast import plots

    means = {(0.1, 2.0): 0.6, (0.9, 2.0): 0.5}
    plain = plots.sweep_heatmap([0.1, 0.9], [2.0], means, 0.55, str(tmp_path / "a.png"))
    boxed = plots.sweep_heatmap([0.1, 0.9], [2.0], means, 0.55, str(tmp_path / "b.png"), chosen=(0.1, 2.0))
    assert open(plain, "rb").read() != open(boxed, "rb").read()


def test_an_interrupted_sweep_is_continued_by_the_advice_it_prints(small_cache, tmp_path, monkeypatch):
    original = engine.loop.train_step

    def step_with_signal(tr, batch, global_step):
        loss = original(tr, batch, global_step)
        if tr.cfg.run_name.startswith("kd") and global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(engine.loop, "train_step", step_with_signal)
    with pytest.raises(Interrupted) as stopped:
        sweep.run(sweep_cfg(small_cache, tmp_path))
    assert "Run the same command again to continue." in str(stopped.value) and "--resume" not in str(stopped.value)
    monkeypatch.setattr(engine.loop, "train_step", original)
    result = sweep.run(sweep_cfg(small_cache, tmp_path))  # the advice: the same command, nothing added
    assert len(result["runs"]) == 2 and not (tmp_path / ".state").exists()


def test_cache_slots_beyond_the_cache_are_refused(small_cache, tmp_path):
    with pytest.raises(ValueError, match="--cache-slots must be at most the 2 slots"):
        sweep.run(sweep_cfg(small_cache, tmp_path, cache_slots=(1, 3)))
    assert not (tmp_path / "sweep.md").exists()
