"""prefopt.flex: FlexAttention block masks read from the segment layout, for GPUs.

On this CPU-only machine FlexAttention runs forward only (torch has no CPU backward for it), so
these tests prove the masks and the forward exactly, and that the fast-path check steps the
kernel aside where it cannot run; training through it is proven on a GPU by the same check."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import transformers as T

from prefopt import flex
from prefopt.attention import NAME as SEGMENT_ATTENTION
from prefopt.attention import segment_kernel, use_plain_attention, use_segment_attention
from prefopt.batching import collate
from prefopt.logprobs import completion_logps, layer_masks

from test_fastpath import build, rows, run
from test_logprobs import Ex, naive_logps

pytestmark = pytest.mark.skipif(not flex.available(), reason="FlexAttention not installed")


def long_rows() -> list[Ex]:
    """Three prompts with 2-3 answers, long enough that a packed row spans several 128-token blocks."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 97, (n,), generator=g).tolist()

    return [Ex(ids(90), [ids(60), ids(45), ids(70)], 0), Ex(ids(30), [ids(20), ids(80), ids(5)], 1),
            Ex(ids(120), [ids(40), ids(40), ids(33)], 2)]


CONFIGS = {
    "none": SimpleNamespace(),
    "window": SimpleNamespace(sliding_window=7),
    "layer types": SimpleNamespace(sliding_window=5, layer_types=["full_attention", "sliding_attention"]),
    "chunks": SimpleNamespace(attention_chunk_size=16, layer_types=["chunked_attention", "full_attention"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_masks_equal_the_dense_masks_and_skip_hidden_blocks(name):
    from torch.nn.attention.flex_attention import create_mask

    config = CONFIGS[name]
    batch = collate(long_rows(), pad_token_id=0, capacity=2000)   # all three segments packed into one row
    assert "attention_mask" not in vars(batch)                     # the dense mask is only built on demand
    R, L = batch.input_ids.shape
    got = flex.block_masks(config, batch.seg_ids, batch.part_ids, batch.position_ids)
    want = layer_masks(config, batch.attention_mask, batch.position_ids)
    if not isinstance(want, dict):
        got, want = {"all": got}, {"all": want}
    assert got.keys() == want.keys()
    for kind, block in got.items():
        Lp = block.seq_lengths[0]
        assert Lp % flex.BLOCK == 0 and Lp >= L
        dense = create_mask(block.mask_mod, R, 1, Lp, Lp, device="cpu")
        assert torch.equal(dense[:, :, :L, :L], want[kind]), kind
        assert torch.equal(dense[0, 0, L:, :], torch.eye(Lp, dtype=torch.bool)[L:]), "padding sees only itself"
        blocks = (Lp // flex.BLOCK) ** 2
        assert 0 < block.kv_num_blocks.sum() < blocks, "fully hidden blocks are skipped"


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding"])
def test_the_flex_kernel_gives_the_plain_log_probs_and_passes_the_check(arch):
    if arch == "llama":
        make = lambda: build(T.LlamaConfig, T.LlamaForCausalLM)                      # noqa: E731
    else:
        make = lambda: build(T.Qwen2Config, T.Qwen2ForCausalLM, sliding_window=6,  # noqa: E731
                             use_sliding_window=True, layer_types=["full_attention", "sliding_attention"])
    model = make()
    assert use_segment_attention(model, flex.NAME) and model.config._attn_implementation == flex.NAME
    data = rows()
    with torch.no_grad():
        got = completion_logps(model, collate(data, pad_token_id=0)).logps
    torch.testing.assert_close(got, naive_logps(make(), data), atol=1e-4, rtol=0)
    fast = run(model, with_grad=False)   # scoring and the reference pass: forward only
    assert fast.features["block_attention"] and not fast.off
    assert model.config._attn_implementation == flex.NAME


def test_where_flex_cannot_train_the_check_switches_it_off_in_one_line(caplog):
    model = build(T.LlamaConfig, T.LlamaForCausalLM)
    use_segment_attention(model, flex.NAME)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        fast = run(model)                 # with gradients: FlexAttention has no CPU backward
    assert not fast.features["block_attention"] and fast.features["masks"] and fast.features["prefix_sharing"]
    lines = [r.getMessage() for r in caplog.records if "block attention" in r.getMessage()]
    assert len(lines) == 1 and "FlexAttention" in lines[0]


def test_the_kernel_is_chosen_by_the_machine_and_undone_to_the_original(monkeypatch):
    assert segment_kernel() == SEGMENT_ATTENTION          # a CPU keeps SDPA per segment
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert segment_kernel() == flex.NAME
    model = build(T.LlamaConfig, T.LlamaForCausalLM, attn="flex_attention")
    assert use_segment_attention(model) and model.config._attn_implementation == flex.NAME
    assert use_segment_attention(model)                   # already switched: kept
    assert use_plain_attention(model) and model.config._attn_implementation == "flex_attention"


def test_generation_runs_through_the_sdpa_fallback():
    model = build(T.LlamaConfig, T.LlamaForCausalLM)
    plain = build(T.LlamaConfig, T.LlamaForCausalLM)
    use_segment_attention(model, flex.NAME)
    prompt = torch.tensor([[5, 9, 11, 20, 3]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), plain.generate(prompt, **kwargs))


def test_on_a_gpu_a_micro_batchs_rows_run_in_one_forward():
    from accelerate.utils import DistributedType

    from prefopt.config import TrainConfig
    from prefopt.train import check_split, row_parts

    batch = collate(rows(), pad_token_id=0)
    cfg = TrainConfig(model="m", data="d")
    on = lambda kind: SimpleNamespace(device=torch.device(kind), distributed_type=DistributedType.NO)  # noqa: E731
    assert len(row_parts(batch, cfg, "pairs", on("cpu"))) == batch.input_ids.shape[0] > 1
    assert row_parts(batch, cfg, "pairs", on("cuda")) == [batch]
    assert check_split(cfg, "pairs", False, torch.device("cpu")) and not check_split(cfg, "pairs", False, "cuda")


def test_compiling_the_kernel_leaves_room_for_every_variant_a_run_compiles(monkeypatch):
    """dtype x grad mode x layer kind x soft-capping: a two-layer-type model in one run needs 8 compiled
    variants, dynamo's default limit, after which FlexAttention would run unfused (seen on an H200)."""
    import torch._dynamo.config as dynamo
    from torch.nn.attention.flex_attention import flex_attention

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(flex, "_compiled", None)
    # dynamo's config module is restored with its own patch(): pytest's monkeypatch deletes its entries
    with dynamo.patch(**{name: 8}):
        assert flex._kernel(torch.device("cpu")) is flex_attention and getattr(dynamo, name) == 8  # eager on CPU
        kernel = flex._kernel(torch.device("cuda"))      # torch.compile is lazy: nothing runs on a GPU here
        assert kernel is flex._kernel(torch.device("cuda")) and getattr(dynamo, name) == flex.RECOMPILE_LIMIT
    with dynamo.patch(**{name: 500}):
        assert flex.allow_recompiles() == 500            # a user's higher limit stays


def _blocks(num: torch.Tensor, index: torch.Tensor) -> set[tuple[int, int, int]]:
    """The (row, query block, key block) triples a BlockMask's (count, index) tables list."""
    return {(r, i, int(index[r, 0, i, j])) for r in range(num.shape[0]) for i in range(num.shape[2])
            for j in range(int(num[r, 0, i]))}


def _layouts():
    """Packed rows with long shared prompts (whole blocks of one segment: full blocks), short segments
    (several in a block), and rows of different lengths (padding blocks)."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, 97, (n,), generator=g).tolist()

    long = [Ex(ids(300), [ids(200), ids(150)], 0), Ex(ids(260), [ids(90), ids(310)], 1)]
    short = [Ex(ids(int(torch.randint(3, 40, (1,), generator=g))), [ids(int(torch.randint(2, 30, (1,), generator=g)))
             for _ in range(2)], i) for i in range(24)]
    return {"long prompts": collate(long, pad_token_id=0, capacity=2000),
            "short segments": collate(short, pad_token_id=0, capacity=700),
            "rows of two lengths": collate(long + short[:6], pad_token_id=0)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_block_layout_is_the_one_torch_finds_from_the_dense_mask(name):
    """block_layout evaluates the mask only where a segment can be seen, a bounded number of blocks at
    a time; the partial and full blocks must be exactly those create_block_mask finds from the whole
    [R, L, L] mask (a block wrongly full skips the mask, one wrongly missing is never computed)."""
    from torch.nn.attention.flex_attention import create_block_mask

    for layout, batch in _layouts().items():
        got = flex.block_masks(CONFIGS[name], batch.seg_ids, batch.part_ids, batch.position_ids)
        for kind, block in (got if isinstance(got, dict) else {"all": got}).items():
            R, Lp = batch.input_ids.shape[0], block.seq_lengths[0]
            want = create_block_mask(block.mask_mod, R, None, Lp, Lp, device="cpu", BLOCK_SIZE=flex.BLOCK)
            assert _blocks(block.kv_num_blocks, block.kv_indices) == _blocks(want.kv_num_blocks, want.kv_indices), \
                (layout, kind)
            assert _blocks(block.full_kv_num_blocks, block.full_kv_indices) == \
                _blocks(want.full_kv_num_blocks, want.full_kv_indices), (layout, kind)
            if layout == "long prompts" and name == "none":
                assert block.full_kv_num_blocks.sum() > 0           # the case where the mask is skipped


def test_the_block_layout_is_classified_a_bounded_number_of_blocks_at_a_time(monkeypatch):
    """Chunked classification gives the same layout as one pass over every candidate block."""
    batch = _layouts()["short segments"]
    whole = flex.block_masks(CONFIGS["window"], batch.seg_ids, batch.part_ids, batch.position_ids)
    monkeypatch.setattr(flex, "CLASSIFY_ELEMENTS", flex.BLOCK * flex.BLOCK * 3)   # three block pairs a pass
    parts = flex.block_masks(CONFIGS["window"], batch.seg_ids, batch.part_ids, batch.position_ids)
    for a, b in ((whole.kv_num_blocks, parts.kv_num_blocks), (whole.kv_indices, parts.kv_indices),
                 (whole.full_kv_num_blocks, parts.full_kv_num_blocks)):
        assert torch.equal(a, b)


COMPILED_CHECK = """
import sys
sys.path.insert(0, "tests")
import torch
from torch.nn.attention.flex_attention import flex_attention
from prefopt import flex
from prefopt.logprobs import layer_masks
from test_flex import CONFIGS, _layouts

batch = _layouts()["long prompts"]
block = flex.block_masks(CONFIGS["none"], batch.seg_ids, batch.part_ids, batch.position_ids)
assert block.full_kv_num_blocks.sum() > 0 and block.kv_num_blocks.sum() < (block.seq_lengths[0] // 128) ** 2
R, L = batch.input_ids.shape
Lp = block.seq_lengths[0]
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(R, 2, Lp, 16, generator=g) for _ in range(3))
got = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=block)
dense = layer_masks(CONFIGS["none"], batch.attention_mask, batch.position_ids)
want = torch.nn.functional.scaled_dot_product_attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], attn_mask=dense)
real = batch.seg_ids >= 0
torch.testing.assert_close(got[:, :, :L].transpose(1, 2)[real], want.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
print("equal")
"""


@pytest.mark.slow
def test_the_compiled_kernel_on_these_block_masks_equals_sdpa_on_the_dense_mask():
    """Eager FlexAttention applies the mask everywhere and ignores the block tables; the compiled kernel
    skips missing blocks and does not apply the mask in full ones. On the CPU's compiled kernel (no
    window: torch 2.13 fails to build it for some masks), the layout's attention equals masked SDPA.
    In its own process: inductor leaves compile workers and variables behind in the one that compiles."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", COMPILED_CHECK], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "equal" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_the_block_mask_benchmark_runs_and_finds_the_same_blocks():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "block_masks.py"
    proc = subprocess.run([sys.executable, str(script), "--rows", "2", "--length", "600", "--segment", "280",
                           "--window", "50", "--repeat", "1", "--threads", "1"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the same blocks: True" in proc.stdout and proc.stdout.count(" ms ") == 2


def test_on_a_gpu_with_flex_a_micro_batch_is_one_row_and_scores_as_the_plain_path(monkeypatch):
    """prefopt.train.one_row: on CUDA with FlexAttention the segments of a micro-batch go into a single
    row (no padding between rows); anywhere else, or without block attention, rows as before. The one
    row's log-probs equal each sequence alone (eager FlexAttention here: forward only on a CPU)."""
    from dataclasses import replace

    import prefopt.attention as attention
    from prefopt.config import TrainConfig
    from prefopt.train import ONE_ROW, _collate_fn, one_row

    data = rows()
    cfg = TrainConfig(model="m", data="d")
    monkeypatch.setattr(attention, "segment_kernel", lambda: flex.NAME)
    assert one_row(cfg, "cuda") and not one_row(cfg, "cpu") and not one_row(cfg, None)
    assert not one_row(replace(cfg, block_attention=False), "cuda") and not one_row(replace(cfg, packing=False), "cuda")
    whole = _collate_fn(data, 0, cfg, "cuda")(list(range(len(data))))
    apart = _collate_fn(data, 0, cfg, "cpu")(list(range(len(data))))
    assert whole.input_ids.shape[0] == 1 < apart.input_ids.shape[0]
    assert whole.input_ids.numel() == int((whole.seg_ids >= 0).sum()) < apart.input_ids.numel()   # no padding
    monkeypatch.setattr(attention, "segment_kernel", lambda: attention.NAME)
    assert not one_row(cfg, "cuda")                       # SDPA per segment would take a dense mask of the row
    model = build(T.Qwen2Config, T.Qwen2ForCausalLM, sliding_window=6, use_sliding_window=True,
                  layer_types=["full_attention", "sliding_attention"])
    assert use_segment_attention(model, flex.NAME)
    with torch.no_grad():
        got = completion_logps(model, collate(data, pad_token_id=0, capacity=ONE_ROW)).logps
    want = naive_logps(build(T.Qwen2Config, T.Qwen2ForCausalLM, sliding_window=6, use_sliding_window=True,
                             layer_types=["full_attention", "sliding_attention"]), data)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
