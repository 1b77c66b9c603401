"""ParallelDims: layouts that cannot run are refused with one line before any process-group work."""

from pathlib import Path

import pytest

from bigmodel.config import ConfigError, load_config
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


def test_valid_layout_passes():
    ParallelDims(dp_replicate=2, dp_shard=2, tp=2, zero_stage=3).validate(8, load_config(TINY))


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
