"""The translation of a Config into DeepSpeed's JSON config: plain dicts, no process group and no deepspeed import,
so config validation can check a user's ds_config.json before any engine exists (bigmodel.engines.deepspeed runs it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigmodel.config.errors import ConfigError
from bigmodel.config.schema import Config

# DeepSpeed keys whose value bigmodel derives from its own config: a user's JSON may repeat them, not change them.
# Each maps to the bigmodel field to change instead.
OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.global_batch_size / train.grad_accum",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "deepspeed.offload_param",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "torch_autocast.enabled": "train.precision",
    "torch_autocast.dtype": "train.precision",
}
REFUSED_SECTIONS = {
    "optimizer": "bigmodel passes torch AdamW built from train.lr, train.beta1/beta2, train.eps, train.weight_decay",
    "scheduler": "bigmodel passes its warmup + cosine schedule built from train.warmup_steps and train.min_lr_ratio",
    "pipeline": "the deepspeed engine does not run pipelines; use engine=native for parallel.pp > 1",
}


def generated_config(cfg: Config) -> dict[str, Any]:
    """DeepSpeed's config for `cfg` before a user's JSON is merged in: every value that changes the arithmetic set
    explicitly (DeepSpeed's own defaults differ, e.g. gradient_clipping 1.0), buckets sized for CPU memory."""
    t, p, d = cfg.train, cfg.parallel, cfg.deepspeed
    dp = p.dp_replicate * p.dp_shard
    bf16 = t.precision == "bf16"
    zero: dict[str, Any] = {
        "stage": p.zero_stage,
        "reduce_bucket_size": d.bucket_size,
        "allgather_bucket_size": d.bucket_size,
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if p.zero_stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": d.bucket_size,
            "stage3_param_persistence_threshold": d.param_persistence_threshold,
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    if p.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu" if d.offload_optimizer else "none"}
    if p.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu" if d.offload_param else "none"}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.global_batch_size // (t.grad_accum * dp),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # bigmodel's bf16 is autocast over fp32 weights, gradients, reductions and optimizer state (as in the native
        # engine); an empty module list keeps DeepSpeed from reducing Linear/Conv gradients in bf16.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        # torch.optim.AdamW with the optimizer state in CPU memory: DeepSpeed would insist on its C++ CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def read_user_config(path: str) -> dict[str, Any]:
    """The JSON object in `path`; ConfigError (one line) if it is missing or not a JSON object."""
    try:
        user = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config_file={path} does not exist; fix the path or leave it empty") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config_file={path} is not valid JSON ({err}); fix the file") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config_file={path} must hold a JSON object; it holds a {type(user).__name__}")
    return user


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed config this run uses: `generated_config(cfg)` with `deepspeed.config_file` merged over it.

    Raises ConfigError (one line naming both values and the fix) if the JSON changes a value bigmodel owns
    (OWNED_KEYS) or brings an optimizer, scheduler or pipeline section.
    """
    generated = generated_config(cfg)
    if not cfg.deepspeed.config_file:
        return generated
    path = cfg.deepspeed.config_file
    user = read_user_config(path)
    for section, reason in REFUSED_SECTIONS.items():
        if section in user:
            raise ConfigError(f"deepspeed.config_file={path} has a {section!r} section; remove it ({reason})")
    ours, theirs = _flatten(generated), _flatten(user)
    for key, field in OWNED_KEYS.items():
        if key in theirs and key in ours and theirs[key] != ours[key]:
            raise ConfigError(
                f"deepspeed.config_file={path} sets {key}={theirs[key]!r} but bigmodel's config gives "
                f"{ours[key]!r} (from {field}); remove {key} from the JSON or change {field}"
            )
        if key in theirs and key not in ours and theirs[key] not in (False, "none", None):
            raise ConfigError(
                f"deepspeed.config_file={path} sets {key}={theirs[key]!r}, which this layout does not use "
                f"(from {field}); remove it from the JSON or change {field}"
            )
    return _merge(generated, user)
