"""benchmarks/gpu_checks.sh in its short mode (toy sizes, on this CPU): every step of the GPU check runs and writes
its file, so that the script a GPU loan runs cannot rot between loans."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"env.txt", "sync.txt", "speed.txt", "smoke.txt", "tests.txt", "together.txt", "policies.txt"}


def test_the_gpu_check_runs_every_step_in_its_short_mode(tmp_path):
    env = {**os.environ, "SHORT": "1", "PY": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "2"}
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_checks.sh")], capture_output=True, text=True,
                         timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    written = set(os.listdir(tmp_path))
    assert written == FILES and len(written) <= 8, written  # what one device call brings back
    text = {name: (tmp_path / name).read_text() for name in FILES}
    assert "all done" in text["env.txt"] and "MISSING" not in text["env.txt"], text["env.txt"]
    smoke = text["smoke.txt"]
    assert "FAILED" not in smoke and smoke.count(" OK ") == 11, smoke
    rows = [line for line in text["sync.txt"].splitlines() if line.startswith("| ") and "path" not in line]
    assert len(rows) == 6 and all(row.split("|")[2].strip() == "0.0" for row in rows), text["sync.txt"]
    speed = [line for line in text["speed.txt"].splitlines() if line.startswith("| resnet8")]
    assert len(speed) == 2 and not any("failed" in line for line in speed), text["speed.txt"]
    for name in ("sync.txt", "speed.txt", "tests.txt", "together.txt", "policies.txt"):
        assert "exit 0" in text[name], (name, text[name][-2000:])
