"""prefopt plan: the memory estimate scales as what it models must, and the CLI prints it."""
from __future__ import annotations

from dataclasses import replace

import pytest

from prefopt import plan as P

# a Llama-7B-like shape and a 1k-token row, so every part is far from rounding
MODEL = P.ModelShape(vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008)
DATA = P.DataShape(row_tokens=1024, row_scored=600)
BASE = P.Setup(dtype="float32")


def est(setup=BASE, data=DATA, model=MODEL) -> P.Estimate:
    return P.estimate(model, data, setup)


def test_param_count_matches_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False)
    shape = P.model_shape(config)
    assert shape.params == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def test_lora_is_smaller_than_full():
    full, lora = est(), est(replace(BASE, lora_r=16))
    assert lora.peak < full.peak / 2
    assert lora.parts["optimizer state"] < full.parts["optimizer state"] / 50


def test_lora_on_the_mlp_keeps_what_the_lean_swiglu_would_recompute():
    attention_only = est(replace(BASE, lora_r=16, lora_targets=("q_proj", "v_proj")))
    with_mlp = est(replace(BASE, lora_r=16, lora_targets=("q_proj", "v_proj", "up_proj")))
    # up_proj's input (the norm output, already kept for q/v in float32) adds nothing; silu(gate) and r-wide
    # intermediates do: one intermediate-wide float32 tensor per token and layer
    extra = with_mlp.parts["activations"] - attention_only.parts["activations"]
    T, I, L = DATA.row_tokens, MODEL.intermediate, MODEL.layers
    assert extra == L * T * (I * 4 + 16 * 4)


def test_low_precision_on_the_host_counts_onednn_kernel_caches():
    from prefopt.runtime import KERNEL_CACHE_ENTRIES

    host = replace(BASE, host=True)
    assert "oneDNN kernel caches" not in est(host).parts
    assert est(replace(host, dtype="bfloat16")).parts["oneDNN kernel caches"] == KERNEL_CACHE_ENTRIES * P.MiB
    assert "oneDNN kernel caches" not in est(replace(BASE, dtype="bfloat16")).parts  # a GPU: cuBLAS, no such caches


def test_checkpointing_lowers_activations():
    plain, ckpt = est(), est(replace(BASE, gradient_checkpointing=True))
    assert ckpt.parts["activations"] < plain.parts["activations"] / 4
    assert ckpt.peak < plain.peak


def test_activations_grow_with_the_row():
    assert est(data=P.DataShape(2048, 600)).parts["activations"] == 2 * est().parts["activations"]


def test_zero3_over_four_processes_divides_weights_and_optimizer():
    one, four = est(), est(replace(BASE, num_processes=4, sharding="zero3"))
    for part in ("weights", "gradients", "optimizer state"):
        assert four.parts[part] == pytest.approx(one.parts[part] / 4, rel=1e-6)
    zero2 = est(replace(BASE, num_processes=4, sharding="zero2"))
    assert zero2.parts["weights"] == one.parts["weights"]
    assert zero2.parts["optimizer state"] == pytest.approx(one.parts["optimizer state"] / 4, rel=1e-6)
    ddp = est(replace(BASE, num_processes=4, sharding="ddp"))
    assert ddp.parts["weights"] == one.parts["weights"]


def test_bf16_mixed_keeps_fp32_master_weights():
    fp32, bf16 = est(), est(replace(BASE, dtype="bfloat16"))
    state = lambda e: e.parts["weights"] + e.parts["gradients"] + e.parts["optimizer state"]  # noqa: E731
    assert state(bf16) >= state(fp32)
    assert bf16.parts["activations"] < fp32.parts["activations"]
    pure = est(replace(BASE, dtype="bfloat16", pure_low_precision=True))
    assert state(pure) == state(fp32) // 2
    # a frozen LoRA base is stored in bfloat16 itself
    assert est(replace(BASE, dtype="bfloat16", lora_r=8)).parts["weights"] < \
        est(replace(BASE, lora_r=8)).parts["weights"]


def test_live_reference_adds_a_copy_cached_none():
    live = est(replace(BASE, live_reference=True))
    assert live.parts["reference"] == est().parts["weights"]
    assert "reference" not in est().parts


def test_lm_head_chunk_is_bounded():
    big_vocab = replace(MODEL, vocab=152064)
    chunk = est(replace(BASE, host=True), model=big_vocab).parts["LM-head chunk"]
    assert chunk < 200 * P.MiB  # on the CPU: two 64 MiB float32 chunks plus the scored hidden states
    gpu = est(model=big_vocab).parts["LM-head chunk"]   # on a GPU the chunk may grow to --lm-head-chunk-size
    assert gpu > chunk
    full = est(replace(BASE, full_lm_head=True), model=big_vocab).parts["LM-head logits"]
    assert full > 10 * chunk


def test_parse_memory():
    assert P.parse_memory("80GiB") == 80 * P.GiB
    assert P.parse_memory("24G") == 24 * P.GiB
    assert P.parse_memory("512MiB") == 512 * P.MiB
    assert P.parse_memory("16") == 16 * P.GiB
    with pytest.raises(ValueError):
        P.parse_memory("lots")


def test_longest_row_is_the_longest_segment():
    lengths = [(10, (5, 7)), (30, (20, 2)), (3, (1, 1))]
    shape = P.data_shape(lengths, batch_size=2)
    assert (shape.row_tokens, shape.row_scored) == (52, 22)
    whole = P.data_shape(lengths, batch_size=3, row_by_row=False)
    assert whole.rows_per_forward * (whole.row_tokens // whole.rows_per_forward) >= 52


@pytest.fixture(scope="module")
def plan_model(tmp_path_factory, tiny_tokenizer):
    from prefopt.tiny import build_llama, save_tiny

    model = build_llama(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    return save_tiny(model, tiny_tokenizer, tmp_path_factory.mktemp("plan") / "model")


def _plan(capsys, *argv):
    from prefopt.cli import main

    rc = main(["plan", *argv])
    return rc, capsys.readouterr().out


def test_cli_prints_the_peak(plan_model, capsys):
    rc, out = _plan(capsys, "--model", str(plan_model), "--data", "tests/data/standard.jsonl")
    assert rc == 0
    line = next(line for line in out.splitlines() if line.startswith("peak "))
    assert "MiB" in line or "GiB" in line
    assert "weights" in line and "optimizer state" in line


def test_cli_fits_and_suggests(plan_model, capsys):
    rc, out = _plan(capsys, "--model", str(plan_model), "--data", "tests/data/standard.jsonl", "--gpu-memory", "80GiB")
    assert rc == 0 and "fits in 80.00 GiB" in out


def test_too_small_budget_gets_fitting_suggestions():
    cfg_like = type("Cfg", (), {"loss_type": ["sigmoid"], "prefix_sharing": True, "plain_path": False,
                                "packing": True, "block_attention": True, "seed": 0, "shuffle": True})()
    plan = P.Plan(model=MODEL, lengths=[(400, (300, 324))] * 8, setup=replace(BASE, batch_size=8), cfg=cfg_like)
    before = plan.estimate().peak
    budget = 40 * P.GiB
    assert before > budget
    found = P.suggest(plan, budget)
    assert found and all(s.fits(budget) for s in found)
    assert all(s.estimate.peak <= budget < before for s in found)
    changes = " ".join(s.change for s in found)
    assert "--lora-r" in changes and "--num-processes" in changes


def test_cli_suggestions_fit(plan_model, capsys):
    from prefopt.config import build_config
    from prefopt.inputs import prepare_examples
    from prefopt.modeling import load_tokenizer

    args = ["--model", str(plan_model), "--data", "tests/data/standard.jsonl"]
    cfg, _ = build_config({"model": str(plan_model), "data": "tests/data/standard.jsonl"})
    plan = P.make_plan(cfg, prepare_examples(cfg, load_tokenizer(str(plan_model)), "pairs", None).train)
    peak = plan.estimate().peak
    runtime = P.CUDA_RUNTIME_BYTES
    budget = runtime + (peak - runtime) * 0.85  # too small for the run, large enough for LoRA
    rc, out = _plan(capsys, *args, "--gpu-memory", f"{budget / P.MiB:.3f}MiB")
    assert "does not fit" in out and "settings that fit:" in out
    assert rc == 0
    for line in out.split("settings that fit:")[1].strip().splitlines():
        size = line.rsplit("peak ", 1)[1]
        assert P.parse_memory(size.replace(" ", "")) <= budget


def test_on_a_gpu_the_largest_forward_is_the_whole_micro_batch(plan_model):
    """prefopt.train.rows_together runs a micro-batch's rows in one forward on CUDA, row by row on the
    host: the plan must follow (measured on an H200 it had counted one row and read 0.63 of the peak)."""
    from prefopt.config import build_config
    from prefopt.inputs import prepare_examples
    from prefopt.modeling import load_tokenizer

    cfg, _ = build_config({"model": str(plan_model), "data": "tests/data/standard.jsonl", "batch_size": 4})
    examples = prepare_examples(cfg, load_tokenizer(str(plan_model)), "pairs", None).train
    gpu = P.make_plan(cfg, examples).data()
    host = P.make_plan(cfg, examples, host=True).data()
    assert host.rows_per_forward == 1 and gpu.rows_per_forward >= 1
    assert gpu.row_tokens > host.row_tokens and gpu.row_scored > host.row_scored
    # with FlexAttention (block attention on a GPU) the micro-batch is one row: its segments, no padding
    assert gpu.one_row and gpu.rows_per_forward == 1 and not host.one_row
    padded = P.make_plan(replace(cfg, block_attention=False), examples).data()
    assert not padded.one_row and padded.row_tokens >= gpu.row_tokens
    segs = [p + sum(c) for p, c in P.example_lengths(examples)]
    assert gpu.row_tokens <= sum(sorted(segs)[-cfg.batch_size:])


def test_with_flex_block_masks_no_dense_mask_is_counted():
    """A [rows, L, L] mask is counted where one is built: on the host (SDPA per segment takes it as
    well) or without block attention on a GPU; FlexAttention's block masks build none."""
    long = P.DataShape(row_tokens=20000, row_scored=8000)
    flex_run, dense_run = est(replace(BASE, dense_mask=False), long), est(BASE, long)
    assert dense_run.parts["backward working set"] - flex_run.parts["backward working set"] == 20000 * 20000


def test_on_a_gpu_the_plan_counts_the_measured_context_and_says_what_the_allocator_adds(plan_model, capsys):
    """The context was 819 MiB on an H200 (512 had been assumed); the caching allocator's reserve is
    said in a note on a GPU, not added, and not said on the host, where RSS is what is planned."""
    gpu, host = est(), est(replace(BASE, host=True))
    assert gpu.parts["CUDA context"] == 820 * P.MiB and "CUDA context" not in host.parts
    assert P.ALLOCATOR_NOTE in gpu.notes and P.ALLOCATOR_NOTE not in host.notes
    rc, out = _plan(capsys, "--model", str(plan_model), "--data", "tests/data/standard.jsonl")
    assert rc == 0 and "note: on a GPU the peak is of live tensors" in out and "expandable_segments" in out
    rc, out = _plan(capsys, "--model", str(plan_model), "--data", "tests/data/standard.jsonl", "--device", "cpu")
    assert rc == 0 and "caching allocator" not in out
