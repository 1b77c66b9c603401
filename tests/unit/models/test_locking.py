"""Locked towers (train.lock_image / lock_text / unlocked_blocks): which parameters freeze, and that frozen ones get
no gradient, no optimizer state, no weight decay and no update in the single-process engine (the reference every
layout is verified against)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigmodel.config import ConfigError, load_config
from bigmodel.data import build_train_loader
from bigmodel.engines import build_engine
from bigmodel.losses import total_loss
from bigmodel.models import build_model
from bigmodel.models.locking import lock_towers
from bigmodel.parallel.context import setup_parallel
from bigmodel.tools.verify import Trace, compare
from bigmodel.train.loop import split_microbatches

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
VISION = ("vision.", "contrastive.visual_projection.")


def tiny(*overrides: str):
    return load_config(TINY, ["--log.wandb=disabled", *overrides])


def frozen_names(*overrides: str) -> tuple[set[str], set[str]]:
    """(frozen, all) parameter names of the tiny model under `overrides`."""
    cfg = tiny(*overrides)
    model = build_model(cfg.model, ("contrastive", "itm", "mlm"), seed=0)
    frozen = set(lock_towers(model, cfg.train))
    assert frozen == {n for n, p in model.named_parameters() if not p.requires_grad}
    return frozen, {n for n, _ in model.named_parameters()}


def test_lock_image_freezes_the_image_tower_and_its_projection_only():
    frozen, names = frozen_names("--train.lock_image=true")
    assert frozen == {n for n in names if n.startswith(VISION)}
    assert "vision.blocks.layers.1.mlp.fc1.weight" in frozen and "contrastive.logit_scale" not in frozen


def test_unlocked_blocks_leave_the_top_block_its_norm_and_projection_trainable():
    frozen, names = frozen_names("--train.lock_image=true", "--train.lock_text=true", "--train.unlocked_blocks=1")
    # tiny has 2 blocks per tower: block 1 is the top one.
    top = ("vision.blocks.layers.1.", "vision.post_norm.", "contrastive.visual_projection.")
    top += ("text.blocks.layers.1.", "text.final_norm.", "contrastive.text_projection.")
    towers = (*VISION, "text.", "contrastive.text_projection.")
    assert frozen == {n for n in names if n.startswith(towers) and not n.startswith(top)}
    assert {"text.token_embedding.weight", "vision.patch_embedding.weight"} <= frozen


def test_frozen_parameters_get_no_gradient_state_decay_or_update():
    cfg = tiny("--train.lock_image=true", "--train.weight_decay=0.1")
    engine = build_engine(cfg, setup_parallel(cfg))
    model = engine.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(VISION) for n in frozen)
    loader = iter(build_train_loader(cfg, 0, 1))
    batch = next(loader)
    loss, _ = total_loss(model(batch), cfg.train.loss_weights)
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(before) - frozen
    model.zero_grad(set_to_none=True)
    stats = engine.train_step(split_microbatches(batch, 1), capture_grads=True)
    assert set(stats.grads) == set(before) - frozen
    engine.train_step(split_microbatches(next(loader), 1))
    in_groups = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}  # decay or not
    with_state = {id(p) for p in engine.optimizer.state}
    for name, param in model.named_parameters():
        if name in frozen:
            assert id(param) not in in_groups and id(param) not in with_state, name
            assert torch.equal(param, before[name]), name  # bitwise: nothing may touch a frozen weight
        else:
            assert id(param) in in_groups and id(param) in with_state, name


def test_locking_a_tower_the_objective_trains_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"train\.lock_text=true freezes the text tower") as err:
        tiny("--train.lock_text=true")
    assert "\n" not in str(err.value)


def test_verify_fails_a_layout_that_trains_a_frozen_parameter_or_freezes_a_trainable_one():
    reference = Trace([1.0], {"text.w": torch.ones(2)})  # the reference with its image tower locked
    for grads in ({"text.w": torch.ones(2), "vision.w": torch.ones(2)}, {}):
        comparison = compare("dp2", reference, Trace([1.0], grads))
        assert comparison.missing and not comparison.passed(1e-5, 1e-6), grads
