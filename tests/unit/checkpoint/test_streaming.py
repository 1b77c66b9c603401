"""The offline checkpoint tools stream tensor by tensor: their peak memory stays within the bound of
bigmodel/bigmodel/bench/reshard_rss.py (the resident size before the tool runs + 6x the largest tensor) on a checkpoint
many times that size (~225 MB: width 512, 3 + 3 blocks, AdamW state; the largest tensor 4 MB, so the bound allows
24 MB over the baseline). Memory, not time: the figure does not depend on how busy the machine is."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")  # export-hf is measured too
if not Path("/proc/self/clear_refs").exists():
    pytest.skip("measuring a peak needs Linux's /proc/self/clear_refs", allow_module_level=True)


def test_tools_stay_within_the_streaming_bound(tmp_path):
    from bigmodel.bench import reshard_rss as bench

    result = bench.run(tmp_path, width=512, layers=3)
    allowance = bench.BOUND_MULTIPLE * result["largest_tensor_bytes"]
    assert result["checkpoint_bytes"] > 8 * allowance  # holding an eighth of it would break the bound
    for tool, figures in result["tools"].items():
        print(
            f"{tool}: {(figures['peak'] - figures['baseline']) / 2**20:.1f} MiB over the baseline "
            f"(bound {allowance / 2**20:.0f})"
        )
        assert figures["peak"] <= figures["bound"], (tool, figures, result["largest_tensor_bytes"])
