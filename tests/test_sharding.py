"""The questions the loop asks of the sharding engines, answered without launching one."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from prefopt.errors import ConfigError
from prefopt.sharding import fill_engine_config, no_split_modules, true_dim, zero_stage
from prefopt.train import param_groups


def zero3_slice(shape: tuple[int, ...]) -> torch.nn.Parameter:
    """What ZeRO-3 leaves on a rank: a flat slice, the real shape in ``ds_shape``."""
    n = 1
    for d in shape:
        n *= d
    p = torch.nn.Parameter(torch.zeros(n // 2))
    p.ds_id, p.ds_shape = 0, torch.Size(shape)
    return p


def test_weight_decay_follows_the_real_shape_of_partitioned_weights():
    model = torch.nn.Module()
    model.weight = zero3_slice((8, 4))
    model.bias = zero3_slice((8,))
    assert model.weight.dim() == 1 and true_dim(model.weight) == 2
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [model.weight] and decay["weight_decay"] == 0.1
    assert no_decay["params"] == [model.bias] and no_decay["weight_decay"] == 0.0


def fake_deepspeed(config: dict, processes: int = 2, stage: int = 2):
    plugin = SimpleNamespace(deepspeed_config=config, zero_stage=stage)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


def test_deepspeed_auto_values_are_filled_from_the_run():
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    fill_engine_config(fake_deepspeed(config), micro_batch_size=4, grad_accum=3, max_grad_norm=0.5)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 4 * 3 * 2
    assert config["gradient_clipping"] == 0.5
    explicit = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0}
    fill_engine_config(fake_deepspeed(explicit), micro_batch_size=4, grad_accum=1, max_grad_norm=0.5)
    assert explicit["train_micro_batch_size_per_gpu"] == 2 and explicit["gradient_clipping"] == 1.0  # the user's


def test_a_deepspeed_accumulation_other_than_grad_accum_is_refused():
    with pytest.raises(ConfigError, match="--grad-accum 2: the DeepSpeed config says gradient_accumulation_steps: 4"):
        fill_engine_config(fake_deepspeed({"gradient_accumulation_steps": 4}), 4, 2, 1.0)


def test_zero_stage_and_other_engines():
    assert zero_stage(fake_deepspeed({}, stage=3)) == 3
    other = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
    assert zero_stage(other) == 0
    # no DeepSpeed, nothing to fill: not even the plugin is looked up
    fill_engine_config(SimpleNamespace(distributed_type=DistributedType.FSDP), 4, 1, 1.0)


def test_layer_classes_for_fsdp_come_from_the_model_or_through_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from prefopt.logprobs import CompletionLogpsModel
    from prefopt.modeling import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    assert no_split_modules(model) == ["LlamaDecoderLayer"]
    assert CompletionLogpsModel(model)._no_split_modules == ["LlamaDecoderLayer"]
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert CompletionLogpsModel(lora)._no_split_modules == ["LlamaDecoderLayer"]
