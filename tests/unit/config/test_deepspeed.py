"""The DeepSpeed config bigmodel generates, the merge of a user's ds_config.json, and the one-line refusals of
engine=deepspeed combinations it does not run. No process group, no DeepSpeed engine: plain config work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigmodel.config import ConfigError, load_config
from bigmodel.config.deepspeed import deepspeed_config
from bigmodel.tools.verify import layout_overrides, parse_layout

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
DS = ["--engine=deepspeed", "--log.wandb=disabled"]


def ds_config(*overrides: str) -> dict:
    return deepspeed_config(load_config(TINY, [*DS, *overrides]))


def test_every_value_that_changes_the_arithmetic_is_explicit():
    config = ds_config("--parallel.dp_shard=2", "--parallel.zero_stage=3", "--train.grad_accum=2")
    # tiny.yaml: global batch 16 over 2 ranks x 2 microbatches.
    assert config["train_batch_size"] == 16
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0  # train.grad_clip; DeepSpeed's default happens to match, not assumed
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 10**7
    assert zero["stage3_param_persistence_threshold"] == 100_000
    assert zero["offload_optimizer"] == {"device": "none"} and zero["offload_param"] == {"device": "none"}
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    assert config["torch_autocast"]["enabled"] is False
    assert "optimizer" not in config and "scheduler" not in config  # bigmodel's AdamW and schedule are passed in


def test_clipping_off_offload_and_bf16_map_through():
    config = ds_config(
        "--parallel.dp_shard=2",
        "--parallel.zero_stage=3",
        "--train.grad_clip=0",
        "--train.precision=bf16",
        "--deepspeed.offload_optimizer=true",
        "--deepspeed.offload_param=true",
    )
    assert config["gradient_clipping"] == 0
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu"}
    # bf16 = autocast over fp32 weights and fp32 reductions (no module's gradients reduced in bf16).
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert config["bf16"] == {"enabled": False}


def write(tmp_path: Path, content: object) -> str:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_user_json_adds_and_tunes(tmp_path):
    user = {
        "zero_optimization": {"reduce_bucket_size": 123, "overlap_comm": True},
        "comms_logger": {"enabled": True},
        "train_batch_size": 16,  # repeating bigmodel's value is fine
    }
    config = ds_config(
        "--parallel.dp_shard=2", "--parallel.zero_stage=2", f"--deepspeed.config_file={write(tmp_path, user)}"
    )
    assert config["zero_optimization"]["reduce_bucket_size"] == 123
    assert config["zero_optimization"]["overlap_comm"] is True
    assert config["zero_optimization"]["stage"] == 2  # kept from bigmodel's
    assert config["comms_logger"] == {"enabled": True}


@pytest.mark.parametrize(
    ("user", "words"),
    [
        ({"train_batch_size": 64}, ["train_batch_size=64", "16", "train.global_batch_size"]),
        ({"gradient_clipping": 0.5}, ["gradient_clipping=0.5", "1.0", "train.grad_clip"]),
        ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage=3", "parallel.zero_stage"]),
        ({"bf16": {"enabled": True}}, ["bf16.enabled=True", "train.precision"]),
        ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps=4", "train.grad_accum"]),
        ({"optimizer": {"type": "Adam"}}, ["'optimizer' section", "train.lr"]),
        ({"scheduler": {"type": "WarmupLR"}}, ["'scheduler' section"]),
    ],
)
def test_user_json_conflicts_are_one_line_errors(tmp_path, user, words):
    path = write(tmp_path, user)
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [*DS, "--parallel.dp_shard=2", "--parallel.zero_stage=2", f"--deepspeed.config_file={path}"])
    message = str(err.value)
    assert "\n" not in message and path in message
    for word in words:
        assert word in message, message


def test_unreadable_user_json_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, words in ((bad, "not valid JSON"), (tmp_path / "missing.json", "does not exist")):
        with pytest.raises(ConfigError, match=words):
            load_config(TINY, [*DS, f"--deepspeed.config_file={path}"])


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["--parallel.pp=2", "--parallel.microbatches=2"], ["parallel.pp=2", "engine=native"]),
        (["--parallel.tp=2"], ["parallel.tp=2", "engine=native"]),
        (["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--parallel.zero_stage=3"], ["dp_replicate"]),
        (["--deepspeed.offload_param=true", "--parallel.dp_shard=2", "--parallel.zero_stage=2"], ["zero_stage=3"]),
        (["--deepspeed.offload_optimizer=true"], ["zero_stage 1-3"]),
        (["--train.compile=true"], ["train.compile"]),
    ],
)
def test_unsupported_combinations_are_refused_in_one_line(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [*DS, *overrides])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_native_engine_ignores_the_deepspeed_section():
    cfg = load_config(TINY, ["--log.wandb=disabled", "--deepspeed.offload_param=true"])
    assert cfg.engine == "native"


def test_verify_layout_names_select_the_engine():
    assert parse_layout("ds-zero2x2") == {"engine": "deepspeed", "parallel.zero_stage": 2, "parallel.dp_shard": 2}
    assert parse_layout("deepspeed+dp2") == {"engine": "deepspeed", "parallel.dp_shard": 2}
    assert parse_layout("dsxzero3x2")["engine"] == "deepspeed"
    assert parse_layout("native-dp2") == {"engine": "native", "parallel.dp_shard": 2}
    # Existing names keep their meaning.
    assert layout_overrides("dp2xtp2+spxzero2") == [
        "--parallel.dp_shard=2",
        "--parallel.tp=2",
        "--parallel.sp=true",
        "--parallel.zero_stage=2",
    ]
    with pytest.raises(ConfigError, match="takes no number"):
        parse_layout("ds2")
