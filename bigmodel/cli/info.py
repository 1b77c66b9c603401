"""`bigmodel info`: parameter count and FLOPs per sample of any config, without building the model's weights."""

from __future__ import annotations

import argparse

from bigmodel.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameter count and FLOPs per sample of a config",
        description="Parameters per part (built on the meta device, so a 10B config costs no memory) and "
        "forward/training FLOPs per sample as the training step runs them.",
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run, takes_overrides=True)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'."""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def run(args: argparse.Namespace) -> int:
    from bigmodel.losses import active_objectives
    from bigmodel.models.flops import count_parameters, flops_per_sample

    cfg = config_from_args(args)
    objectives = active_objectives(cfg.train.loss_weights)
    params = count_parameters(cfg.model, objectives)
    flops = flops_per_sample(cfg.model, objectives, masked_tokens=cfg.data.mlm_probability * cfg.model.context_length)
    print(f"objectives: {', '.join(objectives)}  fusion: {cfg.model.fusion}")
    print("parameters: " + "  ".join(f"{part} {human(n)}" for part, n in params.items()))
    print(
        "forward FLOPs per sample: " + "  ".join(f"{part} {human(n)}" for part, n in flops.items() if part != "train")
    )
    print(f"training FLOPs per sample (forward + backward): {human(flops['train'], 'FLOP')}")
    print(
        f"training FLOPs per step (global batch {cfg.train.global_batch_size}): "
        f"{human(flops['train'] * cfg.train.global_batch_size, 'FLOP')}"
    )
    return 0
