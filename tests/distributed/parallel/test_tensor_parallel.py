"""Tensor and sequence parallel MultimodalEncoder equals the single-process model: weights, losses, gradients and
one optimizer step, for tp 2 and 4, every fusion kind, with and without sequence parallelism (real gloo processes).

One torchrun launch per tp size runs every layout (see tp_worker.py); the tests below assert on its JSON.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bigmodel.config import ConfigError, load_config
from bigmodel.parallel.dims import ParallelDims
from tests.distributed.launch import run_worker

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
LR = 0.5  # the worker's SGD learning rate
# A small global batch keeps a launch short; tp4 needs heads divisible by 4 (tiny has 2). tp2 runs quick_gelu blocks
# (CLIP's activation), tp4 the default gelu.
LAUNCHES = {
    2: ["--train.global_batch_size=8", "--model.activation=quick_gelu"],
    4: ["--train.global_batch_size=8", "--model.vision_heads=4", "--model.text_heads=4", "--fsdp"],
}
LAYOUTS = ["cross", "cross-sp", "merged", "merged-sp", "none", "none-sp", "cross-sp-ac"]

# fp32 tolerances. TP changes only the order of floating-point sums: partial outputs of row-parallel layers are
# all-reduced, the gradients of replicated inputs are summed over ranks, and the vocab-parallel cross-entropy
# combines per-shard maxima and sums. Each reordering moves a result by a few units of fp32 roundoff (6e-8
# relative) of the summands' magnitude. A real bug (a missing all-reduce, a shard taken from the wrong slice, a
# missing or doubled 1/tp) moves results by O(1) relative, at least four orders of magnitude above these bounds.
LOSS_RTOL = 1e-6
"""Per loss part, relative. Measured <= 2e-7 (1-2 roundoff units of a sum over ~100 terms)."""
GRAD_RTOL = 2e-6
"""Gradient deviation relative to the largest reference gradient (~8.5, the position embeddings). An absolute 1e-6
is about one fp32 ulp at that size (9.5e-7), so the bound is relative to it: measured <= 4.5e-7 (3.8e-6 absolute,
4 ulp), allowed ~17 ulp. For scale: the fp32 reference itself is 4.8e-6 away from an fp64 run of the same model
and batch. Measuring per tensor instead would divide by gradients that are exactly zero in exact arithmetic (k_proj
biases: softmax ignores a shift shared by all keys), whose 1e-10 noise says nothing."""
PARAM_ATOL = 1e-6
"""After the SGD step: rounding of p - lr * g, up to 2 ulp of parameters of magnitude <= 4 (position embeddings
after a step of lr 0.5 on gradients ~8), on top of lr times the gradient deviation."""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results(tp): the worker's JSON for that tp size, from one launch per tp per test session."""
    cache: dict[int, dict] = {}

    def get(tp: int) -> dict:
        if tp not in cache:
            out = tmp_path_factory.mktemp(f"tp{tp}") / "results.json"
            cache[tp] = run_worker(tp, Path(__file__).with_name("tp_worker.py"), out, *LAUNCHES[tp])
        return cache[tp]

    return get


def expected_placements(name: str, sequence_parallel: bool) -> list[str] | None:
    """The placements the plan must give parameter `name`; None for a plain replicated tensor."""
    in_block = re.search(r"blocks\.layers\.\d+\.", name) is not None
    if in_block and re.search(r"(q_proj|k_proj|v_proj|mlp\.fc1)\.(weight|bias)$", name):
        return ["S(0)"]  # column parallel: output features (whole heads) split
    if in_block and re.search(r"(out_proj|mlp\.fc2)\.weight$", name):
        return ["S(1)"]  # row parallel: input features split
    if in_block and re.search(r"(out_proj|mlp\.fc2)\.bias$", name):
        return ["R"]  # added once, after the all-reduce / reduce-scatter
    if in_block and re.search(r"(layer_norm1|layer_norm2|cross_norm)\.", name):
        return ["R"] if sequence_parallel else None
    if name in ("text.token_embedding.weight", "mlm_head.decoder.weight", "mlm_head.decoder.bias"):
        return ["S(0)"]  # vocabulary rows of the embedding / of the decoder's output
    return None


@pytest.mark.parametrize("tp", sorted(LAUNCHES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_plan_shards_every_block_and_the_vocabulary(results, tp, layout):
    r = results(tp)["layouts"][layout]
    sequence_parallel = "-sp" in layout
    placements = r["placements"]
    for name, placement in placements.items():
        assert placement == expected_placements(name, sequence_parallel), name
    expected_attentions = {"cross": 2 + 2 + 2, "merged": 2 + 2 + 1, "none": 2 + 2}[layout.split("-")[0]]
    assert sum(name.endswith("q_proj.weight") for name in placements) == expected_attentions
    if not layout.startswith("none"):
        # Vocab-sharded logits reach the loss, so the vocab-parallel cross-entropy is what ran.
        assert r["mlm_logits_placements"] == ["S(1)"]


@pytest.mark.parametrize("tp", sorted(LAUNCHES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequence_parallel_shards_the_residual_stream_unevenly(results, tp, layout):
    stream = results(tp)["layouts"][layout]["vision_stream"]
    assert stream["length"] == 17  # class token + 16 patches: not divisible by 2 or 4
    if "-sp" in layout:
        assert stream["placements"] == ["S(1)"]
        assert stream["local_lengths"] == [len(chunk) for chunk in _chunks(17, tp)]
    else:
        assert stream["placements"] is None and stream["local_lengths"] == [17] * tp


def _chunks(n: int, parts: int) -> list[range]:
    """torch.chunk's split of n items into `parts` (what DTensor's Shard uses): ceil(n / parts) each, last short."""
    size = -(-n // parts)
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


@pytest.mark.parametrize("tp", sorted(LAUNCHES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensor_parallel_matches_single_process(results, tp, layout):
    r = results(tp)["layouts"][layout]
    # Both sides draw every parameter from the same (seed, name) generator; sharding only slices: exact.
    assert r["weights_dev"] == 0.0
    expected_parts = {"contrastive", "total"} if layout.startswith("none") else {"contrastive", "itm", "mlm", "total"}
    assert set(r["loss_rel_dev"]) == expected_parts
    for part, dev in r["loss_rel_dev"].items():
        assert dev <= LOSS_RTOL, (part, dev)
    assert r["grad_scale"] > 1.0, "the reference gradients must be large enough for the comparison to mean something"
    assert r["grad_dev"] <= GRAD_RTOL * r["grad_scale"], (r["grad_dev"], r["worst_grad"])
    assert r["step_dev"] <= LR * GRAD_RTOL * r["grad_scale"] + PARAM_ATOL


def test_fsdp_over_tensor_parallel_matches_single_process(results):
    # dp_shard=2 x tp=2, in the 4-process launch: fully_shard after materialize_model (with sequence parallelism)
    # and before it (without). Same tolerances as tensor parallelism alone: FSDP adds one more reordered sum.
    for key in ("fsdp-sp", "fsdp-shard-first"):
        r = results(4)[key]
        assert r["weights_dev"] == 0.0, key
        for part, dev in r["loss_rel_dev"].items():
            assert dev <= LOSS_RTOL, (key, part, dev)
        assert r["grad_dev"] <= GRAD_RTOL * r["grad_scale"], (key, r["grad_dev"], r["worst_grad"])
        assert r["step_dev"] <= LR * GRAD_RTOL * r["grad_scale"] + PARAM_ATOL, key


def test_tp_that_does_not_divide_the_heads_is_rejected():
    cfg = load_config(TINY)  # 2 heads per tower
    ParallelDims(tp=2).validate(2, cfg)
    with pytest.raises(ConfigError) as err:
        ParallelDims(tp=4).validate(4, cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "parallel.tp=4" in message and "model.vision_heads=2" in message
