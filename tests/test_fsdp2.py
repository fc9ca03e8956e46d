"""prefopt's CompletionLogpsModel under torch's FSDP2 (``fully_shard``), two processes on the CPU (gloo).

accelerate 1.16 enables FSDP only on GPU-type devices, so ``accelerate launch`` with an FSDP config
cannot run here (test_distributed.py tests that prefopt refuses it). torch's FSDP2 itself runs on the
CPU with gloo, so this test shards the wrapper as accelerate's TRANSFORMER_BASED_WRAP would (each
class in ``wrapper._no_split_modules``, then the wrapper) with the fast paths a sharded run asks for
(block attention, packing, prefix sharing, 4-D masks, the fused LM head in chunks of 16 tokens), runs
one step (forward, weighted sum of log-probs, backward, clip_grad_norm_, AdamW) and compares with one
unsharded process over the union of the ranks' real examples: per-sequence log-probs, the gathered
gradients, the gradient norm and the weights after the step. See tests/fsdp2_worker.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("fsdp2_worker.py")
CASES = ("uneven", "filler", "head_unit")
ATOL = 1e-5          # float32: the sharded and unsharded sums differ only in rounding


@pytest.fixture(scope="module")
def fsdp2_results(tiny_model_dir, tmp_path_factory) -> dict[str, dict]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("fsdp2") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(WORKER), "--model-dir", str(tiny_model_dir), "--out", str(out), "--cases", ",".join(CASES)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired as e:  # a collective one rank never joined
        pytest.fail(f"the FSDP2 run hung: {(e.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {r["case"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_matches_one_process(fsdp2_results, case):
    """``uneven``: 5 and 4 different examples on the two ranks; ``filler``: rank 1 runs a filler batch
    whose loss is multiplied by 0, and the step equals one process on rank 0's examples alone;
    ``head_unit``: the final norm and LM head also form their own FSDP unit (what accelerate carves out
    of a model with output embeddings, though not of prefopt's wrapper)."""
    r = fsdp2_results[case]
    # sharded as asked: both decoder layers and the root, every parameter a DTensor holding half its rows
    assert r["no_split_modules"] == ["LlamaDecoderLayer"]
    assert r["sharded_layers"] == 2
    assert r["dtensor_params_per_rank"] == r["params_per_rank"]
    assert all(abs(f - 0.5) < 0.01 for f in r["local_fraction_per_rank"])
    # the fast paths of a sharded run are on: lean activations and the trim off, the rest on
    assert r["features"] == {"lean_activations": False, "trim_last_layer": False, "fused_head": True,
                             "block_attention": True, "packing": True, "prefix_sharing": True, "masks": True}
    assert r["attn"] == "prefopt_sdpa"
    for seen in r["seen_per_rank"]:
        assert seen["segment_attention"] == 2                      # block attention in both layers
    if case != "head_unit":
        # the fused head ran in several chunks, on the whole (gathered) weight
        assert all(c > 1 for c in r["chunks_per_rank"])
        for seen, chunks in zip(r["seen_per_rank"], r["chunks_per_rank"]):
            assert seen["head_chunks"] == chunks
            assert seen["head_weights"] == ["Parameter[262, 32]"]
    # every real sequence compared; the reference agrees with the plain path
    assert r["seqs_compared"] == r["seqs_expected"] == (18 if case != "filler" else 10)
    assert r["plain_logp_max_diff"] < 1e-4
    # the numbers: log-probs, gradients before the step, their norm, the weights after it
    assert r["grads_nonzero"] == r["n_params"]
    assert r["logp_max_diff"] <= ATOL * max(1.0, r["logp_max_abs"] / 10)
    assert r["grad_max_diff"] <= ATOL
    assert r["norm"] > 0.5                                          # the clipping scaled the gradients
    assert r["norm_diff"] <= ATOL * max(1.0, r["ref_norm"])
    assert r["param_max_step"] > 5e-3                               # the step moved the weights
    assert r["param_max_diff"] <= ATOL
