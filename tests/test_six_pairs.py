"""experiments/six_pairs.py in its tiny mode: the six Table 1 pairs, resumable, one combined table."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # six small runs, each compiling its programs: minutes
def test_six_pairs_tiny_runs_every_pair_and_writes_one_table(tmp_path):
    command = [sys.executable, "experiments/six_pairs.py", f"--workdir={tmp_path}", "--tiny"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["pairs"]) == {f"{d}_{m}" for d in ("gtsrb", "cifar10")
                                    for m in ("lenet5", "squeezenet", "resnet18")}
    table = (tmp_path / "table1.md").read_text()
    for model in ("lenet5", "squeezenet", "resnet18"):
        assert f"| {model} | synthetic_signs |" in table
    for pair, timing in result["pairs"].items():
        assert (tmp_path / pair / "report" / "index.html").is_file(), pair
        assert timing["members"] == 2 and timing["train_images_per_second"] > 0
    # Run again: every stage of every pair is up to date, nothing trains.
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage train: running" not in again.stderr and again.stderr.count("up to date") >= 24
    bad = subprocess.run([*command, "--pairs=gtsrb_alexnet"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert bad.returncode != 0 and "unknown pair 'gtsrb_alexnet'" in bad.stderr
