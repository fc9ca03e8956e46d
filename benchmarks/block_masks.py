"""FlexAttention block masks: prefopt.flex.block_layout against torch's create_block_mask.

Both classify the same 128 x 128 blocks of packed, prefix-shared rows (hidden, partial, full) for
one mask_mod; torch's evaluates it on the whole [R, L, L] grid, prefopt's only on the blocks that
can share a segment, 256 block pairs at a time. Each method runs in its own child process, the
methods alternated, ``--repeat`` times; per run it prints the seconds of one build (the median of
three, after a first one) and the peak memory the build added: on CUDA the allocator's peak above
what was allocated before, on a CPU the child's peak RSS above its RSS before the first build.
The two layouts are checked to be the same, block for block.

    python benchmarks/block_masks.py --rows 8 --length 3500 [--window 100] [--device cuda]

The rows: segments of ``--segment`` tokens, each a prompt of 3/7 of it and two completions.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from types import SimpleNamespace

import torch


def layout(rows: int, length: int, segment: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seg = torch.full((rows, length), -1, dtype=torch.long)
    part = torch.zeros(rows, length, dtype=torch.long)
    pos = torch.zeros(rows, length, dtype=torch.long)
    prompt = segment * 3 // 7
    answer = (segment - prompt) // 2
    for r in range(rows):
        for s in range(length // segment):
            a = s * segment
            seg[r, a:a + segment] = s
            part[r, a + prompt:a + prompt + answer] = 1
            part[r, a + prompt + answer:a + segment] = 2
            pos[r, a:a + prompt + answer] = torch.arange(prompt + answer)
            pos[r, a + prompt + answer:a + segment] = torch.arange(prompt, prompt + segment - prompt - answer)
    return seg, part, pos


def build(method: str, config, seg, part, pos):
    from torch.nn.attention.flex_attention import create_block_mask

    from prefopt import flex

    ours = flex.block_masks(config, seg, part, pos)
    if method == "prefopt":
        return ours
    R, Lp = seg.shape[0], ours.seq_lengths[0]
    return create_block_mask(ours.mask_mod, R, None, Lp, Lp, device=seg.device, BLOCK_SIZE=flex.BLOCK)


def child(method: str, a: argparse.Namespace, out) -> None:
    """One method in a fresh process: seconds of a build and the peak memory it added."""
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    seg, part, pos = (t.to(device) for t in layout(a.rows, a.length, a.segment))
    config = SimpleNamespace(sliding_window=a.window) if a.window else SimpleNamespace()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    first = build(method, config, seg, part, pos)
    times = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        build(method, config, seg, part, pos)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - before
    tables = [getattr(first, n).cpu() for n in ("kv_num_blocks", "full_kv_num_blocks")]
    out.send((statistics.median(times), peak, [int(t.sum()) for t in tables], blocks(first)))


def blocks(mask) -> tuple[frozenset, frozenset]:
    """The (row, query block, key block) triples of a BlockMask's partial and full tables."""
    def listed(num, index):
        num, index = num.cpu(), index.cpu()
        return frozenset((r, i, int(index[r, 0, i, j])) for r in range(num.shape[0])
                         for i in range(num.shape[2]) for j in range(int(num[r, 0, i])))
    return listed(mask.kv_num_blocks, mask.kv_indices), listed(mask.full_kv_num_blocks, mask.full_kv_indices)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=3500)
    ap.add_argument("--segment", type=int, default=700)
    ap.add_argument("--window", type=int, default=0, help="a sliding window (0: none)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    got: dict[str, list] = {"prefopt": [], "torch": []}
    for _ in range(a.repeat):
        for method in got:
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=child, args=(method, a, send))
            proc.start()
            got[method].append(recv.recv())
            proc.join()
            s, peak, counts, _ = got[method][-1]
            print(f"{method:8} {s * 1e3:9.1f} ms  +{peak / 2**20:8.1f} MiB  partial/full blocks {counts}", flush=True)
    same = got["prefopt"][0][3] == got["torch"][0][3]
    ratio = statistics.median(r[0] for r in got["torch"]) / statistics.median(r[0] for r in got["prefopt"])
    print(f"{a.rows} rows x {a.length} tokens on {a.device}, window {a.window or 'none'}: prefopt "
          f"{ratio:.1f}x faster; the same blocks: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
