"""Build the benchmark's model, tokenizer and preference pairs locally (nothing is downloaded).

* A byte-level BPE tokenizer (vocabulary 8192) trained with :func:`prefopt.tiny.train_tokenizer`
  on generated text.
* A randomly initialised Llama-architecture model of ~27M parameters (hidden 512,
  6 layers, 8 heads, MLP 1376), saved with ``save_pretrained``.
* ``pairs`` preference pairs whose prompts are 20-200 tokens and whose completions are
  10-250 tokens, chosen and rejected drawn independently (so of different lengths).

Usage: ``python benchmarks/make_bench_data.py WORKDIR [--pairs 256] [--seed 0]``
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vi", "so", "pe", "da", "gu", "ri", "zo", "be", "fa", "ho",
             "ju", "ly", "qu", "wa", "xe", "ni", "mo", "te", "sa", "ki", "po", "du", "le", "ga"]
GOOD = ["helpful", "clear", "correct", "kind", "precise", "honest", "careful", "useful"]
BAD = ["rude", "wrong", "vague", "sloppy", "harmful", "confused", "lazy", "false"]


def make_words(rng: random.Random, n: int) -> list[str]:
    """A pseudo-language vocabulary with a Zipf-like frequency when sampled by rank."""
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


class TextMaker:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.words = make_words(self.rng, 6000)
        self.weights = [1.0 / (rank + 10) for rank in range(len(self.words))]

    def sentence(self, extra: list[str] | None = None) -> str:
        n = self.rng.randint(5, 14)
        ws = self.rng.choices(self.words, weights=self.weights, k=n)
        if extra:
            ws[self.rng.randrange(n)] = self.rng.choice(extra)
        return " ".join(ws).capitalize() + self.rng.choice([".", ".", ".", "?", "!"])

    def text_of_tokens(self, tokenizer, target: int, extra: list[str] | None = None, lead_space: bool = False) -> str:
        """Sentences appended until the text is ``target`` tokens long (no special tokens), cut at a word."""
        words: list[str] = []
        while True:
            words.extend(self.sentence(extra).split())
            text = (" " if lead_space else "") + " ".join(words)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= target:
                break
        lo, hi = 1, len(words)
        while lo < hi:  # shortest word prefix reaching the target
            mid = (lo + hi) // 2
            text = (" " if lead_space else "") + " ".join(words[:mid])
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= target:
                hi = mid
            else:
                lo = mid + 1
        return (" " if lead_space else "") + " ".join(words[:lo])


def build(workdir: Path, pairs: int = 256, seed: int = 0) -> dict:
    from prefopt.tiny import build_llama, save_tiny, train_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    maker = TextMaker(seed)
    corpus = [" ".join(maker.sentence(GOOD + BAD) for _ in range(4)) for _ in range(6000)]
    tokenizer = train_tokenizer(corpus, vocab_size=8192)
    model = build_llama(tokenizer, hidden_size=512, num_layers=6, num_heads=8, intermediate_size=1376,
                        max_position_embeddings=1024, seed=seed)
    model_dir = save_tiny(model, tokenizer, workdir / "model")
    rng = random.Random(seed + 1)
    rows = []
    for _ in range(pairs):
        prompt = maker.text_of_tokens(tokenizer, rng.randint(19, 199)) + " Answer:"
        chosen = maker.text_of_tokens(tokenizer, rng.randint(9, 249), GOOD, lead_space=True)
        rejected = maker.text_of_tokens(tokenizer, rng.randint(9, 249), BAD, lead_space=True)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"model": str(model_dir), "data": str(data), "pairs": pairs,
            "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer)}
    (workdir / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(build(a.workdir, a.pairs, a.seed), indent=1))


if __name__ == "__main__":
    main()
