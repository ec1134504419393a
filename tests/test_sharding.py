"""FSDP2 pieces of align.distributed on one process (a 1-rank gloo group: the weights become
sharded DTensors, so gathering, saving and loading take the sharded path). The 2-process runs,
equal to DDP, are in test_multiprocess.py."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from align import distributed
from align.config import ConfigError, LoraConfig, PPOJobConfig
from align.ppo import _check_parallelism


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_sharded_policy_saves_and_loads_only_through_gathered_weights(one_rank_group, tiny_model_path, tmp_path):
    from align.adapters import adapter_weights, save_adapter
    from align.models import load_base
    from align.config import ModelConfig
    from align.ppo.actor_critic import ActorCritic

    base, _ = load_base(ModelConfig(name=tiny_model_path, dtype="float32", device="cpu"))
    ac = ActorCritic(base, LoraConfig(), with_critic=True)
    with torch.no_grad():
        for p in ac.parameters():
            if p.requires_grad:
                p.normal_()
    before = {n: p.detach().clone() for n, p in ac.named_parameters() if p.requires_grad}
    distributed.shard(ac)
    lora = [p for n, p in ac.named_parameters() if "lora_" in n]
    assert lora and all(hasattr(p, "full_tensor") for p in lora)  # the adapters are sharded now
    assert hasattr(ac.value_head.weight, "full_tensor")  # a trainable module outside the layers too
    assert distributed.sharded(ac)
    with pytest.raises(RuntimeError, match="gather the adapter on every rank first"):
        save_adapter(ac.model, tmp_path / "refused", "tiny")
    assert not (tmp_path / "refused").exists()
    weights = adapter_weights(ac.model)
    assert weights and all(".default." in k and "lora_" in k for k in weights)  # the adapter, not the base
    folder = ac.save_policy(tmp_path, "tiny", state=weights)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    for name, w in before.items():
        if ".default." in name:
            key = name.removeprefix("model.").replace(".default.", ".")
            assert torch.equal(saved[key], w), name
    state = ac.trained_state()
    assert set(state) == set(before) and all(torch.equal(state[n], before[n]) for n in before)
    ac.load_trained_state({n: torch.zeros_like(w) for n, w in state.items()})
    assert all(float(v.abs().sum()) == 0 for v in ac.trained_state().values())


def test_parallelism_follows_the_launcher_unless_chosen(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert distributed.parallelism("fsdp2") == "single"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # one process under torchrun: FSDP2 on a group of one
    assert distributed.parallelism("fsdp2") == "fsdp2" and distributed.parallelism("auto") == "single"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert distributed.parallelism("auto") == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what configs/accelerate/fsdp.yaml sets
    assert distributed.parallelism("auto") == "fsdp2"
    assert distributed.parallelism("ddp") == "ddp"


@pytest.mark.parametrize("overrides, key", [({"lora.r": "full"}, "ppo.parallelism"),
                                            ({"rollout.engine": "vllm", "rollout.sync": "merged"}, "rollout.sync"),
                                            ({"rollout.engine": "vllm", "rollout.sync": "auto"}, "rollout.sync")])
def test_fsdp2_refuses_what_would_gather_the_whole_base(overrides, key):
    cfg = PPOJobConfig()
    for k, v in overrides.items():
        section, name = k.split(".")
        setattr(getattr(cfg, section), name, v)
    _check_parallelism(cfg, "ddp")  # fine under DDP
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        _check_parallelism(cfg, "fsdp2")


def test_each_process_gets_its_own_share_of_the_server_gpus():
    from align.placement import server_devices_of_rank

    assert server_devices_of_rank("", rank=0, per_machine=1) == ""  # one process: inherit, as before
    assert [server_devices_of_rank("4,5,6,7", r, 4) for r in range(4)] == ["4", "5", "6", "7"]
    assert [server_devices_of_rank("2,3,4,5", r, 2) for r in range(2)] == ["2,3", "4,5"]
    for bad in ("", "4,5,6"):  # every server on the same GPUs, or an uneven split
        with pytest.raises(ValueError, match="list a multiple of 2 GPUs"):
            server_devices_of_rank(bad, 0, 2)


def test_a_vllm_server_per_process_needs_its_gpus_named(monkeypatch):
    from align.ppo import _server_devices

    cfg = PPOJobConfig()
    cfg.rollout.engine = "vllm-server"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg.rollout.server_devices = "2,3"
    assert _server_devices(cfg) == "3"
    cfg.rollout.server_devices = ""
    with pytest.raises(ConfigError, match="key 'rollout.server_devices'"):
        _server_devices(cfg)


def test_the_deepspeed_config_is_one_accelerate_accepts():
    """DeepSpeed itself is not installed here (nothing of it has run): what can be checked is that
    accelerate reads configs/accelerate/deepspeed_zero2.yaml and builds its plugin from it, with
    the batch sizes left to the Trainer ("auto", filled from align's train.* keys)."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    config = load_config_from_file(str(Path(__file__).parents[1] / "configs" / "accelerate" / "deepspeed_zero2.yaml"))
    assert config.distributed_type == "DEEPSPEED"
    plugin = DeepSpeedPlugin(**config.deepspeed_config)
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["train_batch_size"] == "auto"
