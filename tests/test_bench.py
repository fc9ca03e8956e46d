"""`prefopt bench`: real steps through the training loop, JSON fields, FLOP counting; speed flags run."""
from __future__ import annotations

import json
import os
import math

import pytest
import torch

from prefopt.batching import collate, padded_token_count
from prefopt.layers import trim_last_mlp
from prefopt.benchmarking import BenchHooks, ModelShape, attended_pairs, forward_flops, summarize
from prefopt.cli import build_parser, main
from prefopt.data.tokenize import TokenizedExample
from prefopt.modeling import load_causal_lm

FIELDS = ("steps", "pairs", "tokens", "real_tokens", "tokens_per_second", "pairs_per_second",
          "steady_tokens_per_second", "wall_tokens_per_second", "peak_rss_bytes", "peak_gpu_bytes",
          "model_flops_per_second", "peak_flops_per_second", "mfu", "losses", "step_seconds", "setup_seconds",
          "train_seconds", "reference", "token_digest", "settings")


def bench(tiny_model_dir, pref_files, tmp_path, *extra) -> dict:
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(tiny_model_dir), "--data", str(pref_files[0]), "--steps", "2",
                 "--batch-size", "4", "--learning-rate", "1e-3", "--num-threads", "1", "--json", str(out), *extra])
    assert code == 0
    return json.loads(out.read_text())


def test_bench_runs_two_steps_and_writes_the_fields(tiny_model_dir, pref_files, tmp_path, capsys, cache_dir):
    result = bench(tiny_model_dir, pref_files, tmp_path)
    printed = capsys.readouterr().out
    for field in FIELDS:
        assert field in result, field
    assert result["steps"] == 2 and result["pairs"] == 8 and len(result["losses"]) == 2
    assert abs(result["losses"][0] - math.log(2)) < 1e-5  # step 1 starts at the reference
    assert result["tokens"] >= result["real_tokens"] > 0  # the prompt is computed once per pair
    assert result["tokens_per_second"] > 0 and result["pairs_per_second"] > 0
    assert result["peak_rss_bytes"] > 50 * 2**20 and result["peak_gpu_bytes"] is None
    assert 0 < result["mfu"] < 1.5
    assert result["reference"] == "CachedReference"
    assert result["settings"]["num_threads"] == 1
    assert "tokens/s" in printed and "peak RSS" in printed and "MFU" in printed
    # the bench uses its own temporary cache and output directory unless told otherwise
    assert not cache_dir.exists()


def test_bench_format_json_prints_json(tiny_model_dir, pref_files, tmp_path, capsys, cache_dir):
    code = main(["bench", "--model", str(tiny_model_dir), "--data", str(pref_files[0]), "--steps", "1",
                 "--batch-size", "2", "--num-threads", "1", "--format", "json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 1 and result["pairs"] == 2


def test_bench_with_a_live_reference_counts_its_forward(tiny_model_dir, pref_files, tmp_path, cache_dir):
    result = bench(tiny_model_dir, pref_files, tmp_path, "--no-ref-cache")
    assert result["reference"] == "ModelReference"
    assert abs(result["losses"][0] - math.log(2)) < 1e-5


def test_bench_rejects_bad_steps(tiny_model_dir, pref_files, capsys):
    assert main(["bench", "--model", str(tiny_model_dir), "--data", str(pref_files[0]), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_bench_is_registered():
    parser = build_parser()
    args = parser.parse_args(["bench", "--model", "m", "--data", "d", "--steps", "3", "--no-packing"])
    assert args.steps == 3 and args.packing is False


def _example(index, prompt, chosen, rejected):
    return TokenizedExample(prompt_ids=list(range(1, prompt + 1)), completions=[[7] * chosen, [8] * rejected],
                            index=index, line=index + 1)


def test_flop_count_follows_the_layout(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    shape = ModelShape.of(model)
    cfg = model.config
    per_layer = 4 * cfg.hidden_size ** 2 + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size
    assert shape.body_params == cfg.num_hidden_layers * per_layer + cfg.hidden_size  # + final norm
    examples = [_example(0, 5, 3, 4), _example(1, 2, 6, 1)]
    shared = collate(examples, pad_token_id=0)
    # prefix sharing: each completion attends to the prompt and to itself, causally
    expected_pairs = sum(p * (p + 1) // 2 + sum(c * p + c * (c + 1) // 2 for c in cs)
                         for p, cs in ((5, (3, 4)), (2, (6, 1))))
    assert attended_pairs(shared) == expected_pairs
    scored = 3 + 4 + 6 + 1
    assert forward_flops(shape, shared) == (2 * shape.body_params * shared.real_tokens
                                            + 2 * shape.hidden * shape.vocab * scored
                                            + 4 * shape.attn_width * shape.layers * expected_pairs)
    # without prefix sharing the prompt is computed once per completion: more tokens, more FLOPs
    plain = collate(examples, pad_token_id=0, prefix_sharing=False, packing=False)
    assert plain.real_tokens == sum(padded_token_count(e) for e in examples)
    assert forward_flops(shape, plain) > forward_flops(shape, shared)
    # the last MLP on the head's rows only: prompt rows but the last one (read by every completion) skip it
    assert trim_last_mlp(model)
    trimmed = ModelShape.of(model)
    mlp_params = 3 * cfg.hidden_size * cfg.intermediate_size
    assert trimmed.skipped_params == mlp_params
    unread = (5 - 1) + (2 - 1) + 2 * 2  # each prompt's rows but its last; each completion's last token
    assert shared.real_tokens - shared.hidden_index.unique().numel() == unread
    assert forward_flops(trimmed, shared) == forward_flops(shape, shared) - 2 * mlp_params * unread


def test_summary_uses_steady_state_and_counts_padded_tokens(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    hooks = BenchHooks()

    class Data:
        train = [_example(0, 5, 3, 4), _example(1, 2, 6, 1)]

    hooks.on_train_start(policy=model, reference=None, data=Data, steps=2, device="cpu")
    batch = collate(Data.train, pad_token_id=0)
    hooks.on_step(1, [batch], {"loss": 0.69})
    hooks.on_step(2, [batch], {"loss": 0.5})
    result = summarize(hooks, setup_seconds=1.0, wall_seconds=5.0, peak=(1e9, "test"), settings={})
    assert result["tokens"] == 2 * (5 + 3 + 5 + 4 + 2 + 6 + 2 + 1)
    assert result["pairs"] == 4 and result["losses"] == [0.69, 0.5]
    assert result["mfu"] == pytest.approx(3 * forward_flops(hooks.shape, batch) / hooks.records[1].seconds / 1e9)


def test_gradient_checkpointing_runs(tiny_model_dir, pref_files, tmp_path, cache_dir):
    plain = bench(tiny_model_dir, pref_files, tmp_path)
    ckpt = bench(tiny_model_dir, pref_files, tmp_path, "--gradient-checkpointing")
    assert ckpt["settings"]["gradient_checkpointing"] is True
    # recomputing activations changes no number: same losses step by step
    assert ckpt["losses"] == pytest.approx(plain["losses"], abs=1e-5)


def test_compile_flag_compiles_the_decoder(tiny_model_dir, pref_files, tmp_path, cache_dir, monkeypatch):
    """``--compile`` reaches ``Module.compile`` on the decoder, and the compiled decoder trains.

    Inductor (the default backend) spends a minute or more generating C++ for even a tiny model
    on CPU, too slow for a unit test: the call is kept but given dynamo's ``eager`` backend, which
    still captures and runs the graph, so the flag, the graph capture and two steps are all tested.
    """
    real_compile = torch.nn.Module.compile
    compiled = []

    def compile_eager(self, *args, **kwargs):
        compiled.append(self)
        real_compile(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    torch._dynamo.reset()
    result = bench(tiny_model_dir, pref_files, tmp_path, "--compile")
    assert [type(m).__name__ for m in compiled] == ["LlamaModel"]
    assert compiled[0]._compiled_call_impl is not None
    assert result["settings"]["compile"] is True and result["steps"] == 2
    assert abs(result["losses"][0] - math.log(2)) < 1e-5


def test_row_split_changes_no_number_and_drops_padding(tiny_model_dir):
    from prefopt.batching import split_rows
    from prefopt.config import TrainConfig
    from prefopt.logprobs import CompletionLogpsModel
    from prefopt.train import forward_loss, loss_params

    torch.manual_seed(0)
    examples = [_example(i, 2 + (5 * i) % 9, 1 + (3 * i) % 7, 1 + (4 * i) % 5) for i in range(7)]
    batch = collate(examples, pad_token_id=0)
    parts = split_rows(batch)
    assert len(parts) == batch.input_ids.shape[0] > 1
    assert sum(p.slots for p in parts) == sum(p.real_tokens for p in parts) == batch.real_tokens
    assert sorted(i for p in parts for i in p.example_index.tolist()) == list(range(7))
    # without prefix sharing a pair's completions sit in different rows: no split
    plain = collate(examples, pad_token_id=0, prefix_sharing=False)
    assert split_rows(plain) == [plain]

    model = load_causal_lm(str(tiny_model_dir))
    policy = CompletionLogpsModel(model)
    cfg = TrainConfig(model="m")
    params = loss_params(cfg)

    class Ref:
        def logps(self, b):
            return -3.0 * b.example_index.repeat_interleave(2).float()

    def grads(batches):
        model.zero_grad(set_to_none=True)
        total = []
        for b in batches:
            losses, _, _ = forward_loss(policy, b, Ref(), cfg, "pairs", params)
            (losses.sum() / 7).backward()
            total.append(losses.detach())
        return torch.cat(total), {n: p.grad.clone() for n, p in model.named_parameters()}

    whole_losses, whole = grads([batch])
    split_losses, split = grads(parts)
    order = torch.cat([p.example_index for p in parts]).argsort()
    assert torch.allclose(split_losses[order], whole_losses, atol=1e-6)
    for name, g in whole.items():
        assert torch.allclose(split[name], g, atol=1e-6, rtol=1e-5), name


def test_blas_buffers_from_malloc_unless_the_user_chose(monkeypatch):
    from prefopt.runtime import malloc_for_blas_buffers

    monkeypatch.delenv("MKL_DISABLE_FAST_MM", raising=False)
    monkeypatch.setenv("PREFOPT_MALLOC", "system")
    assert not malloc_for_blas_buffers() and "MKL_DISABLE_FAST_MM" not in os.environ
    monkeypatch.delenv("PREFOPT_MALLOC")
    assert malloc_for_blas_buffers() and os.environ["MKL_DISABLE_FAST_MM"] == "1"
    monkeypatch.setenv("MKL_DISABLE_FAST_MM", "0")
    assert not malloc_for_blas_buffers() and os.environ["MKL_DISABLE_FAST_MM"] == "0"


def test_onednn_kernel_caches_bounded_unless_the_user_chose(monkeypatch):
    from prefopt.runtime import KERNEL_CACHE_ENTRIES, bounded_kernel_caches

    names = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    for n in names:
        monkeypatch.delenv(n, raising=False)
    monkeypatch.setenv("PREFOPT_MALLOC", "system")
    assert not bounded_kernel_caches() and not any(n in os.environ for n in names)
    monkeypatch.delenv("PREFOPT_MALLOC")
    assert bounded_kernel_caches() and all(os.environ[n] == str(KERNEL_CACHE_ENTRIES) for n in names)
    monkeypatch.delenv("LRU_CACHE_CAPACITY")
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")  # the user's own choice stands
    assert not bounded_kernel_caches() and "LRU_CACHE_CAPACITY" not in os.environ
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"


def test_cpu_allocator_tunings_apply_only_without_a_gpu(monkeypatch):
    import glob

    from prefopt import runtime

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("PREFOPT_MALLOC", raising=False)
    monkeypatch.delenv("MKL_DISABLE_FAST_MM", raising=False)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/nvidia0"])
    assert runtime.gpu_present() and runtime.cpu_tunings() == []
    assert "MKL_DISABLE_FAST_MM" not in os.environ and "LRU_CACHE_CAPACITY" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the GPU is hidden: CPU training
    assert not runtime.gpu_present()
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: True)
    assert "MKL_DISABLE_FAST_MM=1" in runtime.cpu_tunings() and os.environ["MKL_DISABLE_FAST_MM"] == "1"
