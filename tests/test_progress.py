"""progress.py and what a run prints at its start: bars on a terminal only, the time estimate, distill's start line."""
import subprocess
import sys

from kdfast import progress
from kdfast.engine.records import duration, kd_line, time_estimate

from .test_runs import ROOT


def test_a_bar_shows_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    assert not progress.bar(10, "x", True).disable and progress.bar(10, "x", False).disable
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    assert progress.bar(10, "x", True).disable


def test_a_redirected_log_gets_lines_not_redraws_and_the_run_s_time_estimate(tiny_data, tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:  # --progress is on (the default); the output is a file
        done = subprocess.run([sys.executable, "-m", "kdfast.train", "--model", "resnet8", "--epochs", "2",
                               "--batch-size", "4", "--data", tiny_data["data"], "--cache-dir", tiny_data["cache_dir"],
                               "--out-dir", str(tmp_path), "--precision", "fp32"], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "it/s" not in text
    assert "[resnet8] estimated from 8 steps: " in text and "for the training left (evaluation not counted)" in text
    assert text.count("[resnet8] epoch ") == 2


def test_the_estimate_and_distill_s_start_line_say_what_they_mean():
    assert [duration(s) for s in (45, 600, 36000)] == ["45 s", "10 min", "10.0 h"]
    assert time_estimate("r", 0.5, 100, 1000, 9) == ("[r] estimated from 9 steps: 50 s an epoch, 8 min for the "
                                                     "training left (evaluation not counted)")
    cached = {"mode": "cached", "teacher_cache": "cache/t.h5", "cache_slots": 4, "teacher_model": "resnet18",
              "teacher_accuracy": 0.91, "method": "kd", "alpha": 0.5, "tau": 4.0, "logit_std": False}
    assert kd_line(cached) == ("distilling from resnet18, test accuracy 0.9100 | kd alpha 0.5 tau 4 | logits from the "
                               "cache cache/t.h5 (4 slots)")
    online = {"mode": "online", "teacher": "m/t.pth", "teacher_model": "resnet18", "method": "dkd", "alpha": None,
              "tau": 4.0, "dkd_alpha": 1.0, "dkd_beta": 8.0}
    assert kd_line(online) == "distilling from resnet18 | dkd tau 4 alpha 1 beta 8 | teacher run online (m/t.pth)"
