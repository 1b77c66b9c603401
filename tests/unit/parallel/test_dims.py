"""ParallelDims: layouts that cannot run are refused with one line before any process-group work."""

from pathlib import Path

import pytest

from bigmodel.config import ConfigError, load_config
from bigmodel.config.validate import resolve_dp_shard
from bigmodel.parallel.dims import ParallelDims
from bigmodel.tools.verify import parse_layout

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"


@pytest.mark.parametrize(
    ("dims", "world", "expected"),
    [
        (ParallelDims(dp_shard=2, tp=2), 2, "needs 4 processes but 2 were started"),
        (ParallelDims(tp=4), 4, "parallel.tp=4 does not divide model.vision_heads=2"),
        (ParallelDims(tp=3), 3, "parallel.tp=3 does not divide"),
        (ParallelDims(sp=True), 1, "needs parallel.tp > 1"),
        (ParallelDims(zero_stage=2), 1, "only one"),
        (ParallelDims(dp_replicate=2, dp_shard=2, zero_stage=1), 4, "dp_replicate=1"),
        (ParallelDims(dp_replicate=2, zero_stage=3), 2, "HSDP needs parallel.dp_shard > 1"),
    ],
)
def test_invalid_layouts_are_one_line_errors(dims, world, expected):
    cfg = load_config(TINY)
    with pytest.raises(ConfigError) as info:
        dims.validate(world, cfg)
    assert "\n" not in str(info.value)
    assert expected in str(info.value), str(info.value)


def test_a_wrong_world_size_suggests_dp_shard_minus_one_only_where_it_fits():
    cfg = load_config(TINY)
    with pytest.raises(ConfigError, match=r"start 1 processes, or set parallel.dp_shard=-1"):
        ParallelDims().validate(2, cfg)  # the default layout on two processes: -1 would give dp_shard=2
    with pytest.raises(ConfigError) as info:
        ParallelDims(tp=2).validate(3, cfg)  # 3 processes are no multiple of tp=2: -1 would not fit either
    assert "dp_shard=-1" not in str(info.value)


def test_valid_layout_passes():
    ParallelDims(dp_replicate=2, dp_shard=2, tp=2, zero_stage=3).validate(8, load_config(TINY))


@pytest.mark.parametrize(
    ("overrides", "world", "dp_shard"),
    [
        ([], 1, 1),
        ([], 4, 4),
        (["--parallel.tp=2"], 8, 4),
        (["--parallel.dp_replicate=2", "--parallel.pp=2", "--parallel.microbatches=2"], 8, 2),
    ],
)
def test_dp_shard_minus_one_takes_what_the_other_axes_leave(overrides, world, dp_shard):
    cfg = load_config(TINY, ["--parallel.dp_shard=-1", *overrides])
    resolve_dp_shard(cfg, world)
    assert cfg.parallel.dp_shard == dp_shard
    ParallelDims.from_config(cfg).validate(world, cfg)


def test_dp_shard_minus_one_that_cannot_fit_is_one_line():
    cfg = load_config(TINY, ["--parallel.dp_shard=-1", "--parallel.tp=2"])
    with pytest.raises(ConfigError) as info:
        resolve_dp_shard(cfg, 3)
    assert str(info.value) == (
        "parallel.dp_shard=-1 takes the processes that parallel.dp_replicate=1 x tp=2 x pp=1 = 2 leave, but 3 "
        "processes are not a multiple of 2; start a multiple of 2 processes or change those degrees"
    )


def test_resolved_dp_shard_is_validated_like_an_explicit_one():
    # tiny.yaml's global batch of 16 cannot be split over 32 data-parallel ranks: the batch check runs on the result.
    cfg = load_config(TINY, ["--parallel.dp_shard=-1"])
    with pytest.raises(ConfigError, match="cannot be split over 32 data-parallel ranks"):
        resolve_dp_shard(cfg, 32)


def test_an_explicit_dp_shard_is_kept_and_zero_refused():
    cfg = load_config(TINY, ["--parallel.dp_shard=2"])
    resolve_dp_shard(cfg, 4)
    assert cfg.parallel.dp_shard == 2  # validate() then says it needs 2 processes, as before
    with pytest.raises(ConfigError, match=r"^parallel.dp_shard=0 is invalid"):
        load_config(TINY, ["--parallel.dp_shard=0"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dp2", {"parallel.dp_shard": 2}),
        ("zero3x4", {"parallel.zero_stage": 3, "parallel.dp_shard": 4}),
        ("tp2+sp", {"parallel.tp": 2, "parallel.sp": True}),
        ("dp2xtp2xzero3", {"parallel.dp_shard": 2, "parallel.tp": 2, "parallel.zero_stage": 3}),
        ("hsdp2x2", {"parallel.dp_replicate": 2, "parallel.dp_shard": 2, "parallel.zero_stage": 3}),
        ("zero3x2-keep", {"parallel.zero_stage": 3, "parallel.dp_shard": 2, "parallel.reshard_after_forward": False}),
    ],
)
def test_layout_names(name, expected):
    assert parse_layout(name) == expected


@pytest.mark.parametrize("name", ["tq2", "dp", "hsdp2"])
def test_bad_layout_names(name):
    with pytest.raises(ConfigError):
        parse_layout(name)
