"""End-to-end training: it learns, it saves a loadable model, it resumes exactly, it matches a plain loop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, write_jsonl
from one_row_cli import force_one_row
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.cli import main
from prefopt.config import TrainConfig, build_config
from prefopt.errors import ConfigError
from prefopt.train import train

FAST = dict(batch_size=8, learning_rate=5e-3, lr_scheduler="constant", progress=False, logging_steps=1)


def cfg_for(tiny_model_dir, pref_files, out: Path, **kw) -> TrainConfig:
    base = dict(model=str(tiny_model_dir), data=str(pref_files[0]), eval_data=str(pref_files[1]),
                output_dir=str(out), **FAST)
    base.update(kw)
    return TrainConfig(**base)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_dpo_learns_the_rule_and_saves_a_loadable_model(tiny_model_dir, pref_files, tmp_path, cache_dir):
    out = tmp_path / "run"
    result = train(cfg_for(tiny_model_dir, pref_files, out, max_steps=24, eval_steps=8, save_steps=12))
    metrics = rows(out / "metrics.jsonl")
    evals = [m for m in metrics if "eval/rewards/accuracies" in m]
    assert result["eval/rewards/accuracies"] > 0.9
    # the first logged step starts from the reference: rewards 0, loss ln 2
    first = metrics[0]
    for key in ("step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm",
                "tokens_per_second", "pairs_seen"):
        assert key in first, key
    assert evals[-1]["eval/rewards/accuracies"] > 0.9
    assert first["pairs_seen"] == 8
    # final/ loads with plain transformers and scores the same as the trained policy in the eval command
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "README.md").exists()
    assert model.config.vocab_size > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["beta"] == 0.1
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out / "final"), "--ref-model", str(tiny_model_dir), "--data",
                 str(pref_files[1]), "--output", str(report)]) == 0
    scored = json.loads(report.read_text())
    assert abs(scored["rewards/accuracies"] - result["eval/rewards/accuracies"]) < 1e-6
    assert abs(scored["loss"] - result["eval/loss"]) < 1e-5
    assert len(scored["per_example"]) == 32
    assert {"policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
            "ref_rejected_logps"} <= set(scored["per_example"][0])


def test_untrained_policy_is_at_chance(tiny_model_dir, pref_files, tmp_path):
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(pref_files[1]), "--output",
                 str(report)]) == 0
    scored = json.loads(report.read_text())
    assert abs(scored["loss"] - 0.6931471805599453) < 1e-6  # policy == reference: margins are 0
    assert scored["rewards/accuracies"] == 0.0


def test_resume_equals_uninterrupted(tiny_model_dir, pref_files, tmp_path, cache_dir):
    full = tmp_path / "full"
    common = dict(batch_size=4, save_steps=3, grad_accum=2, eval_data=None)
    train(cfg_for(tiny_model_dir, pref_files, full, max_steps=6, **common))
    part = tmp_path / "part"
    train(cfg_for(tiny_model_dir, pref_files, part, max_steps=3, **common))
    # continue the 3-step run to 6 steps from its checkpoint, as a killed run would
    state = json.loads((part / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["pairs_seen"] == 24
    train(cfg_for(tiny_model_dir, pref_files, part, max_steps=6, resume="latest", **common))
    a, b = rows(full / "metrics.jsonl"), rows(part / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if k not in ("tokens_per_second",):
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), k
    wa, wb = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def naive_dpo(model_dir: Path, data: Path, steps: int, batch: int, lr: float, beta: float, clip: float) -> dict:
    """A plain loop over the file's rows in order, written without any prefopt code."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, eps=1e-8, weight_decay=0.0)
    pairs = rows(data)

    def logp(model, prompt, completion):
        p = tok(prompt).input_ids
        c = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
        out = model(torch.tensor([p + c])).logits.log_softmax(-1)[0]
        return sum(out[len(p) - 1 + k, c[k]] for k in range(len(c)))

    for step in range(steps):
        chunk = pairs[step * batch:(step + 1) * batch]
        losses = []
        for r in chunk:
            pc, pr = logp(policy, r["prompt"], r["chosen"]), logp(policy, r["prompt"], r["rejected"])
            with torch.no_grad():
                rc, rr = logp(ref, r["prompt"], r["chosen"]), logp(ref, r["prompt"], r["rejected"])
            losses.append(-torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))))
        torch.stack(losses).mean().backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return {k: v.detach() for k, v in policy.state_dict().items()}


def test_no_shuffle_float32_equals_a_plain_loop(tiny_model_dir, pref_files, tmp_path, cache_dir):
    out = tmp_path / "run"
    train(cfg_for(tiny_model_dir, pref_files, out, max_steps=3, batch_size=4, grad_accum=2, shuffle=False,
                  learning_rate=1e-3, max_grad_norm=0.5, save_steps=None, eval_data=None))
    ours = load_file(str(out / "final" / "model.safetensors"))
    theirs = naive_dpo(tiny_model_dir, pref_files[0], steps=3, batch=8, lr=1e-3, beta=0.1, clip=0.5)
    # Matrix products over different row sets (packing, the last MLP on the head's rows only) round
    # differently in float32; AdamW's normalised update turns that into up to ~1e-3 of lr per step on
    # near-zero gradients (5.2e-6 after 3 steps with transformers 5.24, before and after the fast-path check).
    for k, v in ours.items():
        assert torch.allclose(v, theirs[k], atol=1e-5), (k, (v - theirs[k]).abs().max().item())


def test_yaml_config_flags_win_and_unknown_keys_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.5\nlearning_rate: 1e-5\nloss_type: ipo\nbatch_size: 2\n")
    cfg, explicit = build_config({"beta": 0.2}, str(path))
    assert cfg.beta == 0.2 and cfg.learning_rate == 1e-5 and cfg.loss_type == ["ipo"] and cfg.batch_size == 2
    assert {"beta", "learning_rate", "loss_type", "batch_size"} == explicit
    path.write_text("betta: 0.5\n")
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        build_config({}, str(path))
    path.write_text("batch_size: two\n")
    with pytest.raises(ConfigError, match="batch_size"):
        build_config({}, str(path))


def test_default_prompt_budget_follows_a_short_max_length():
    cfg, _ = build_config({"max_length": 512})
    assert cfg.max_prompt_length == 256
    assert build_config({"max_length": 2048})[0].max_prompt_length == 512  # the default where it fits
    with pytest.raises(ConfigError, match="max-prompt-length"):  # given explicitly, it is checked
        build_config({"max_length": 512, "max_prompt_length": 512})


def test_resolved_config_reloads(tiny_model_dir, pref_files, tmp_path, cache_dir):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(pref_files[0]), "--output-dir", str(out),
                 "--max-steps", "1", "--no-progress", "--beta", "0.3", "--save-steps", "none"]) == 0
    cfg, _ = build_config({}, str(out / "config.yaml"))
    assert cfg.beta == 0.3 and cfg.max_steps == 1


@pytest.mark.parametrize("n_rows", [1])  # 5 rows over 2 processes: tests/test_distributed.py
def test_uneven_eval_shares_across_processes_do_not_hang(tiny_model_dir, pref_files, tmp_path, cache_dir, n_rows):
    """Three eval rows over two processes with eval batch 1: the second process has a batch fewer; one
    row: it has none (and no metric names). It must still take part in every collective, and the
    metrics equal one process's over the same rows."""
    out = tmp_path / "ddp"
    three = write_jsonl(rows(pref_files[1])[:n_rows], tmp_path / "three.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFOPT_CACHE": str(cache_dir), "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "prefopt.cli", "train",
           "--model", str(tiny_model_dir), "--data", str(pref_files[0]), "--eval-data", str(three),
           "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--eval-batch-size", "1",
           "--eval-steps", "1", "--logging-steps", "1", "--save-steps", "none", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tmp_path / "single"
    train(TrainConfig(model=str(tiny_model_dir), data=str(pref_files[0]), eval_data=str(three),
                      output_dir=str(single), max_steps=2, batch_size=4, grad_accum=2, eval_batch_size=1,
                      eval_steps=1, logging_steps=1, save_steps=None, progress=False))
    ours = [m for m in rows(out / "metrics.jsonl") if "eval/loss" in m]
    theirs = [m for m in rows(single / "metrics.jsonl") if "eval/loss" in m]
    assert [m["step"] for m in ours] == [1, 2]
    assert [m["eval/loss"] for m in ours] == pytest.approx([m["eval/loss"] for m in theirs], rel=1e-5)


def test_list_options_take_commas_or_spaces(tmp_path):
    from prefopt.cli import build_parser

    args = build_parser().parse_args(["train", "--loss-type", "sigmoid,sft", "--loss-weights", "1.0,0.5"])
    cfg, _ = build_config({k: v for k, v in vars(args).items() if k not in ("command", "config", "func")})
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5]
    args = build_parser().parse_args(["train", "--loss-type", "sigmoid", "sft", "--loss-weights", "1", "0.5"])
    cfg, _ = build_config({k: v for k, v in vars(args).items() if k not in ("command", "config", "func")})
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5]


def test_weight_decay_spares_biases_and_norms():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefopt.train import param_groups

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32))  # q/k/v have biases
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, spared = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    assert {names[id(p)] for p in spared["params"]} == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert any(n.endswith("q_proj.bias") for n in (names[id(p)] for p in spared["params"]))
    assert any(n.endswith("norm.weight") for n in (names[id(p)] for p in spared["params"]))
    assert len(decayed["params"]) + len(spared["params"]) == len(list(model.parameters()))
    assert param_groups(model, 0.0)[0]["weight_decay"] == 0.0 and len(param_groups(model, 0.0)) == 1


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_flat_adamw_state_changes_no_number(fused, amsgrad, tmp_path):
    """Pre-made moment buffers in one block: the same updates and state as torch's lazy AdamW, also after a load."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefopt.train import flat_adamw_state, param_groups

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32))
    models = [model, copy.deepcopy(model), copy.deepcopy(model)]

    def make(m):
        groups = param_groups(m, 0.1)
        groups[1]["amsgrad"] = amsgrad  # per-group options differ: the block holds each group's buffers
        return torch.optim.AdamW(groups, lr=1e-2, fused=fused)

    flat, plain, loaded = (make(m) for m in models)
    assert flat_adamw_state(flat) == len(list(model.parameters()))
    storages = {t.untyped_storage().data_ptr() for st in flat.state.values() for k, t in st.items() if k != "step"}
    assert len(storages) == 1

    def step(opts, seed):
        for opt in opts:
            torch.manual_seed(seed)
            for g in opt.param_groups:
                for p in g["params"]:
                    p.grad = torch.randn_like(p)
            opt.step()

    for seed in range(3):
        step([flat, plain], seed)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    sa, sb = flat.state_dict(), plain.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k in sa["state"][i]:
            x, y = sa["state"][i][k], sb["state"][i][k]
            assert (x.dtype, x.device, x.shape) == (y.dtype, y.device, y.shape) and torch.equal(x, y), (i, k)

    # a checkpoint of the flat state loads (weights_only) and, copied back into a block, continues identically
    torch.save(sa, tmp_path / "opt.pt")
    models[2].load_state_dict(models[0].state_dict())
    loaded.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert flat_adamw_state(loaded) == len(list(model.parameters()))
    step([loaded, plain], 7)
    for a, b in zip(models[2].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert flat_adamw_state(torch.optim.RMSprop(model.parameters())) == 0


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10), (4, 37)])
def test_lr_schedule_matches_transformers(kind, warmup, total):
    from transformers import get_scheduler

    from prefopt.config import TrainConfig
    from prefopt.train import build_scheduler

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(total + 2):  # a step past the end too: the decay stays at 0
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: build_scheduler(TrainConfig(model="m", data="d", lr_scheduler=kind), opt, warmup, total))
    name = "constant_with_warmup" if kind == "constant" else kind
    theirs = lrs(lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total))
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[0] == (0.0 if warmup else 0.5)


def test_bco_delta_is_the_running_mean_of_rewards_and_survives_a_resume(tiny_model_dir, pref_files, tmp_path,
                                                                        cache_dir):
    common = dict(loss_type=["bco_pair"], logging_steps=1, eval_data=None, batch_size=4, learning_rate=1e-3)
    full = tmp_path / "full"
    train(cfg_for(tiny_model_dir, pref_files, full, max_steps=6, **common))
    logged = [r for r in rows(full / "metrics.jsonl") if "bco/delta" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    means = [r["bco/reward_mean"] for r in logged]
    assert logged[0]["bco/delta"] == 0.0
    for k in range(1, 6):  # step k+1 uses the mean of the k earlier steps' mean rewards
        assert logged[k]["bco/delta"] == pytest.approx(sum(means[:k]) / k, rel=1e-6, abs=1e-9)
    assert len(set(means)) > 1 and logged[-1]["bco/delta"] != 0.0
    part = tmp_path / "part"
    train(cfg_for(tiny_model_dir, pref_files, part, max_steps=3, save_steps=3, **common))
    train(cfg_for(tiny_model_dir, pref_files, part, max_steps=6, save_steps=3, resume="latest", **common))
    resumed = [r for r in rows(part / "metrics.jsonl") if "bco/delta" in r]
    assert [r["bco/delta"] for r in resumed] == pytest.approx([r["bco/delta"] for r in logged], rel=1e-5, abs=1e-7)
    fixed = tmp_path / "fixed"
    train(cfg_for(tiny_model_dir, pref_files, fixed, max_steps=2, bco_delta=0.25, **common))
    assert not any("bco/delta" in r for r in rows(fixed / "metrics.jsonl"))


def test_eval_runs_on_its_own_cadence(tiny_model_dir, pref_files, tmp_path, cache_dir):
    out = tmp_path / "run"
    train(cfg_for(tiny_model_dir, pref_files, out, max_steps=7, logging_steps=4, eval_steps=3, save_steps=None))
    logged = rows(out / "metrics.jsonl")
    assert [r["step"] for r in logged if "loss" in r] == [4, 7]
    assert [r["step"] for r in logged if "eval/loss" in r] == [3, 6, 7]   # 3 and 6 fall between log steps
    assert all("eval/loss" not in r for r in logged if "loss" in r)


def test_resume_refuses_changed_settings_and_drops_newer_checkpoints(tiny_model_dir, pref_files, tmp_path,
                                                                      cache_dir):
    from prefopt.errors import ConfigError

    out = tmp_path / "run"
    train(cfg_for(tiny_model_dir, pref_files, out, max_steps=6, save_steps=2, batch_size=4, eval_data=None))
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-2", "step-4", "step-6"]
    with pytest.raises(ConfigError, match="--batch-size was 4, now 8"):
        train(cfg_for(tiny_model_dir, pref_files, out, max_steps=6, save_steps=2, batch_size=8, eval_data=None,
                      resume=str(out / "checkpoints" / "step-2")))
    with pytest.raises(ConfigError, match="the training data"):
        train(cfg_for(tiny_model_dir, pref_files, out, max_steps=6, save_steps=2, batch_size=4, eval_data=None,
                      data=str(pref_files[1]), resume="latest"))
    train(cfg_for(tiny_model_dir, pref_files, out, max_steps=3, save_steps=2, batch_size=4, eval_data=None,
                  resume=str(out / "checkpoints" / "step-2")))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]


def test_one_row_trains_as_rows_do_in_float32_and_under_bfloat16_autocast(tiny_model_dir, pref_files, tmp_path,
                                                                          monkeypatch):
    """The one-row layout through the whole loop (reference table, accumulation, evaluation) gives the
    rows' numbers: to float32 noise in float32, and under bfloat16 autocast within the scale of bfloat16's
    own noise (measured: up to 0.97x as far from the rows' bfloat16 run as that run is from float32)."""
    keys = ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "eval/loss", "eval/logps/chosen")

    def run(name: str, dtype: str, one: bool) -> dict[str, list[float]]:
        with monkeypatch.context() as m:
            if one:
                force_one_row(m.setattr)
            out = tmp_path / name
            train(cfg_for(tiny_model_dir, pref_files, out, max_steps=3, batch_size=4, grad_accum=2, shuffle=False,
                          learning_rate=1e-3, save_steps=None, eval_steps=3, dtype=dtype,
                          cache_dir=str(tmp_path / f"cache-{name}")))
        logged = rows(out / "metrics.jsonl")
        return {k: [r[k] for r in logged if k in r] for k in keys}

    rows32, one32 = run("rows32", "float32", False), run("one32", "float32", True)
    rows16, one16 = run("rows16", "bfloat16", False), run("one16", "bfloat16", True)
    for k in keys:
        assert rows32[k] and len(one32[k]) == len(rows32[k]) == len(one16[k]) == len(rows16[k]), k
        assert one32[k] == pytest.approx(rows32[k], rel=1e-5, abs=1e-6), k
        precision = max(abs(a - b) for a, b in zip(rows16[k], rows32[k]))
        layout = max(abs(a - b) for a, b in zip(one16[k], rows16[k]))
        assert layout <= 3 * max(precision, 1e-6), (k, layout, precision)
