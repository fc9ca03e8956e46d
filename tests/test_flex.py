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

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(dynamo, name, 8)
    monkeypatch.setattr(flex, "_compiled", None)
    from torch.nn.attention.flex_attention import flex_attention

    assert flex._kernel(torch.device("cpu")) is flex_attention and getattr(dynamo, name) == 8  # eager on CPU
    kernel = flex._kernel(torch.device("cuda"))      # torch.compile is lazy: nothing runs on a GPU here
    assert kernel is flex._kernel(torch.device("cuda")) and getattr(dynamo, name) == flex.RECOMPILE_LIMIT
    monkeypatch.setattr(dynamo, name, 500)
    assert flex.allow_recompiles() == 500            # a user's higher limit stays
