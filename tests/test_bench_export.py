"""experiments/bench_export.py in its quick mode: ONNX exports timed in onnxruntime against PyTorch
float32 and int8, one JSON object last."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.torch
def test_bench_export_quick_times_every_variant_and_torch(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    command = [sys.executable, "experiments/bench_export.py", "--quick", "--models=lenet5",
               "--widths=0.25", "--batch=8"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "ORT int8/ORT float32" in done.stdout and "ORT int8/PyTorch int8" in done.stdout
    assert result["batch"] == 8 and result["steps"] == 2 and result["rounds"] == 1
    assert isinstance(result["cpu"]["model"], str) and result["cpu"]["model"]
    flags = result["cpu"]["flags"]
    if flags is not None:  # no /proc/cpuinfo elsewhere
        assert set(flags) >= {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"}
        assert all(isinstance(v, bool) for v in flags.values())
    (row,) = result["models"]
    assert row["model"] == "lenet5" and row["width"] == 0.25
    variants = {"float32", "w8a8", "float16", "w4a8", "dynamic_int8"}
    assert set(row["onnx_bytes"]) == variants and set(row["ort_img_s"]) == variants
    assert all(row["ort_img_s"][v] > 0 and row["onnx_bytes"][v] > 0 for v in variants)
    assert row["onnx_bytes"]["w8a8"] < row["onnx_bytes"]["float32"]
    assert row["onnx_bytes"]["w4a8"] < row["onnx_bytes"]["w8a8"]
    assert row["bytes_ratio_vs_float32"]["float32"] == 1.0
    assert 0 < row["bytes_ratio_vs_float32"]["w8a8"] < 1
    assert row["torch_img_s"]["float32"] > 0 and row["torch_img_s"]["int8"] > 0
    assert row["torch_int8_mode"] == "eager" and row["torch_weights"] == "compax"
    for ratio in ("ratio_ort_int8_vs_ort_float32", "ratio_ort_int8_vs_torch_int8",
                  "ratio_ort_float32_vs_torch_float32"):
        assert math.isfinite(row[ratio]) and row[ratio] > 0, ratio
    assert math.isclose(row["ratio_ort_int8_vs_ort_float32"],
                        row["ort_img_s"]["w8a8"] / row["ort_img_s"]["float32"])
