"""One TRL DPOTrainer run, for ``bench_vs_trl.py`` (run it with a Python that has ``trl`` installed).

It uses TRL's public API only (DPOConfig, DPOTrainer, a TrainerCallback) and writes a JSON
file with per-step losses and times, the pairs processed, and a digest of the token ids
TRL trained on, so the driver can check both trainers saw the same tokens.

Usage: ``python benchmarks/trl_dpo_run.py --model DIR --data FILE --steps N --out FILE [--precompute] [--gpu]``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    ap.add_argument("--gpu", action="store_true", help="on CUDA, bf16 autocast over float32 weights (bf16=True)")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    step_times: list[float] = []

    def now() -> float:
        if a.gpu:
            torch.cuda.synchronize()  # a step's kernels are done when its time is taken
        return time.perf_counter()

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            step_times.append(now())

        def on_step_end(self, args, state, control, **kw):
            step_times.append(now())

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        config = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=a.batch_size,
            gradient_accumulation_steps=1,
            max_steps=a.steps,
            learning_rate=a.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            max_grad_norm=a.max_grad_norm,
            beta=a.beta,
            loss_type=["sigmoid"],
            max_length=a.max_length,
            precompute_ref_log_probs=a.precompute,
            train_sampling_strategy="sequential",  # no shuffle: the same pairs in the same order as prefopt
            seed=a.seed,
            bf16=a.gpu,
            fp16=False,
            use_cpu=not a.gpu,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        )
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        # a fresh datasets cache: nothing (tokenization, precomputed reference log-probs) carries over between runs
        dataset = load_dataset("json", data_files=a.data, split="train", cache_dir=f"{tmp}/hf-datasets")
        trainer = DPOTrainer(model=a.model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Timer()])
        trainer.train()

        digest = hashlib.blake2b(digest_size=16)
        tokens = 0
        pairs = min(len(trainer.train_dataset), a.steps * a.batch_size)
        for i in range(pairs):
            ex = trainer.train_dataset[i]
            digest.update(json.dumps([ex["prompt_ids"], [ex["chosen_ids"], ex["rejected_ids"]]]).encode())
            tokens += 2 * len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"])
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        result = {
            "trainer": "trl",
            "precompute_ref_log_probs": a.precompute,
            "steps": trainer.state.global_step,
            "pairs": pairs,
            "tokens": tokens,
            "token_digest": digest.hexdigest(),
            "losses": losses,
            "step_seconds": [t1 - t0 for t0, t1 in zip(step_times, step_times[1:])],
            "train_seconds": step_times[-1] - step_times[0] if len(step_times) > 1 else None,
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__,
            "optimizer_fused": bool(trainer.optimizer.param_groups[0].get("fused")),
            "reference_model_loaded": trainer.ref_model is not None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if a.gpu else None,
        }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
