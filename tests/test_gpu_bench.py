"""benchmarks/gpu.py (prefopt against TRL on a GPU) must not rot between GPU loans: its smoke mode runs
the same code on the CPU with a tiny model and must report sensible figures."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_smoke_run_reports_speed_memory_and_mfu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ours = result["prefopt"]
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["steps"] == 3
    assert ours["tokens_per_second"] > 0 and 0 < ours["mfu"] < 1 and ours["peak_rss_bytes"] > 0
    assert len(ours["losses"]) == 3 and abs(ours["losses"][0] - math.log(2)) < 1e-4
    assert "block attention" in ours["fast_paths"]
    if result["trl_skipped"] is None:          # TRL installed here: the same tokens, the same losses
        assert result["ratios"]["same_tokens"] and result["ratios"]["loss_max_diff"] < 1e-4
    else:
        assert "trl" not in result and "TRL not run" in proc.stdout
    assert "MFU" in proc.stdout
    assert result["checkpointed"]["prefopt"]["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert "with --gradient-checkpointing" in proc.stdout


def test_without_a_gpu_it_says_so_and_measures_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "no GPU" in proc.stdout and not (tmp_path / "x.json").exists()


def _gpu_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_plan_line_is_read_and_set_against_live_tensors_and_reserved_memory_plus_the_cuda_context():
    gpu = _gpu_module()
    out = "x\nmemory plan: peak 6.50 GiB (weights 1.84 GiB, optimizer state 3.68 GiB)\ny"
    assert gpu.planned_peak(out) == int(6.5 * 2**30)
    assert gpu.planned_peak("memory plan: peak 712.4 MiB (weights 1.0 MiB)") == int(712.4 * 2**20)
    assert gpu.planned_peak("no plan line") is None
    ours = {"plan_peak_bytes": 6 * 2**30, "peak_gpu_reserved_bytes": 5 * 2**30, "cuda_context_bytes": 2**30,
            "peak_gpu_bytes": 4 * 2**30}
    check = gpu.plan_check(ours)
    assert check["measured_bytes"] == 5 * 2**30 and check["ratio"] == 1.2     # what the plan counts
    assert check["ratio_reserved"] == 1.0                                     # what nvidia-smi shows
    assert gpu.plan_check({**ours, "peak_gpu_reserved_bytes": None}) is None      # a CPU run: nothing to set it against
