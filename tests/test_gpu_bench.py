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


def test_without_a_gpu_it_says_so_and_measures_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "no GPU" in proc.stdout and not (tmp_path / "x.json").exists()
