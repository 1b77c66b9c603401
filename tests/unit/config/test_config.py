"""Config loading: defaults, overrides, round trip, and one-line errors that name the field and the fix."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from bigmodel.cli.common import split_overrides
from bigmodel.config import Config, ConfigError, load_config, save_config
from bigmodel.config.reference import render_reference

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny.yaml"

# (overrides applied to configs/tiny.yaml, a word the message must contain: the offending field)
BAD_OVERRIDES = [
    (["--train.steps=0"], "train.steps"),
    (["--train.steps=abc"], "train.steps"),
    (["--train.stpes=10"], "did you mean train.steps"),
    (["--modle.fusion=none"], "did you mean model"),
    (["--model.fusion=late"], "model.fusion"),
    (["--model.fusin=none"], "did you mean model.fusion"),
    (["--model.patch_size=7"], "model.patch_size"),
    (["--model.vision_heads=3"], "model.vision_heads"),
    (["--model.text_heads=5"], "model.text_heads"),
    (["--model.dropout=1.5"], "model.dropout"),
    (["--model.activation=relu"], "model.activation"),
    (["--train.grad_accum=3"], "train.grad_accum"),
    (["--train.global_batch_size=6", "--train.grad_accum=2"], "even microbatch"),
    (["--train.global_batch_size=1", "--train.loss_weights.itm=0"], "contrastive"),
    (["--train.precision=fp16"], "train.precision"),
    (["--train.lr=-1"], "train.lr"),
    (["--train.warmup_steps=20"], "train.warmup_steps"),
    (["--train.loss_weights.itmm=1"], "did you mean train.loss_weights.itm"),
    (
        ["--train.loss_weights.contrastive=0", "--train.loss_weights.itm=0", "--train.loss_weights.mlm=0"],
        "train.loss_weights",
    ),
    (["--model.fusion=none"], "model.fusion_layers"),
    (["--model.fusion=none", "--model.fusion_layers=0"], "train.loss_weights.itm"),
    (["--model.fusion_layers=0"], "model.fusion_layers"),
    (["--model.text_causal=true"], "model.text_causal"),
    (["--data.mlm_probability=0"], "data.mlm_probability"),
    (["--data.source=shards"], "data.train_shards"),
    (["--data.source=s3"], "data.source"),
    (["--parallel.pp=2"], "parallel.microbatches"),
    (["--parallel.pp=8", "--parallel.microbatches=8"], "need at least as many Transformer blocks"),
    (["--parallel.pp=2", "--parallel.microbatches=2", "--parallel.pp_layers=[1,2]"], "parallel.pp_layers"),
    (["--parallel.pp=2", "--parallel.microbatches=2", "--train.grad_accum=2"], "train.grad_accum"),
    (
        [
            "--parallel.pp=2",
            "--parallel.microbatches=2",
            "--parallel.pp_schedule=zero_bubble",
            "--parallel.pp_virtual_stages=1",
        ],
        "pp_virtual_stages",
    ),
    (
        [
            "--parallel.pp=2",
            "--parallel.microbatches=3",
            "--train.global_batch_size=18",
            "--parallel.pp_schedule=interleaved_1f1b",
        ],
        "multiple of 2",
    ),
    (["--parallel.tp=0"], "parallel.tp"),
    (["--parallel.tp=2", "--train.compile=true"], "train.compile_backend=aot_eager"),
    (["--parallel.zero_stage=5"], "parallel.zero_stage"),
    (["--parallel.sp=true"], "parallel.sp"),
    (["--parallel.microbatches=4"], "parallel.microbatches"),
    (["--parallel.pp_schedule=magic"], "parallel.pp_schedule"),
    (["--engine=deepspeed", "--parallel.tp=2"], "engine=native"),
    (["--engine=deepspeed", "--parallel.reshard_after_forward=false"], "parallel.reshard_after_forward"),
    (["--engine=jax"], "engine"),
    (["--log.wandb=maybe"], "log.wandb"),
    (["--checkpoint.keep=0"], "checkpoint.keep"),
    (["--model=3"], "model"),
    (["--model.image_size.x=3"], "model.image_size"),
    (["train.steps"], "--section.key=value"),
    # The bad inputs for the objectives and training options (tiny.yaml: contrastive, itm, mlm on).
    (["--train.loss_weights.siglip=1"], "set one of them to 0"),
    (
        ["--train.loss_weights.contrastive=0", "--train.loss_weights.siglip=1", "--train.siglip_exchange=ring"],
        "train.siglip_exchange=gather",
    ),
    (["--train.siglip_exchange=bidir"], "train.siglip_exchange"),
    (["--model.patch_dropout=1.0"], "model.patch_dropout"),
    (["--train.accumulation=cached"], "is a no-op"),
    (["--train.accumulation=cached", "--train.grad_accum=2", "--train.loss_weights.contrastive=0"], "naive"),
    (["--train.accumulation=cached", "--parallel.pp=2", "--parallel.microbatches=2"], "parallel.pp=1"),
    (["--train.lock_text=true"], "train.loss_weights.mlm=0"),
    (
        [
            "--train.lock_image=true",
            "--train.lock_text=true",
            "--train.loss_weights.itm=0",
            "--train.loss_weights.mlm=0",
        ],
        "unlock one tower",
    ),
    (["--train.unlocked_blocks=1"], "no tower is locked"),
    (["--train.lock_image=true", "--train.unlocked_blocks=2"], "locks nothing"),
    (["--train.loss_weights.caption=1"], "model.text_causal=true"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), BAD_OVERRIDES, ids=lambda x: " ".join(x) if isinstance(x, list) else None
)
def test_bad_override_is_one_line_error_naming_the_field(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    assert expected in message, message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [1, 2\n", "not valid YAML at line"),
        ("- a\n- b\n", "must hold a mapping"),
        ("model:\n  fusion: cross\n  bogus: 1\n", "unknown config key model.bogus"),
        ("trian:\n  steps: 3\n", "did you mean train"),
        ("train:\n  loss_weights: 1.0\n", "train.loss_weights must be a mapping"),
    ],
)
def test_bad_yaml_files(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert expected in str(info.value), str(info.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_typed_and_applied():
    cfg = load_config(TINY, ["--train.steps=7", "--train.lr=3e-4", "--model.fusion=merged", "--log.progress=false"])
    assert cfg.train.steps == 7
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.fusion == "merged"
    assert cfg.log.progress is False


def test_space_separated_overrides_are_accepted():
    assert split_overrides(["--train.steps", "5", "--model.fusion=none"]) == ["--train.steps=5", "--model.fusion=none"]
    with pytest.raises(ConfigError, match="has no value"):
        split_overrides(["--train.steps"])
    with pytest.raises(ConfigError, match="unrecognised argument"):
        split_overrides(["--verbose"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(TINY, ["--train.steps=9", "--train.loss_weights.mlm=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_every_recipe_is_valid():
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(recipes) >= 7
    for recipe in recipes:
        load_config(recipe)


def _sections(cls):
    yield cls
    for field in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[field.name]
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp)


def test_every_field_is_documented():
    for section in _sections(Config):
        for name, info in section.__pydantic_fields__.items():
            assert info.description and len(info.description) > 10, f"{section.__name__}.{name} has no docstring"


def test_configuration_reference_is_in_sync():
    on_disk = (ROOT / "docs" / "configuration.md").read_text()
    assert on_disk == render_reference(), "regenerate: python -m bigmodel.config.reference > docs/configuration.md"
