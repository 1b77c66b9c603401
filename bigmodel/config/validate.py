"""Checks that involve more than one field. Single-field types and ranges are checked by the schema itself."""

from __future__ import annotations

import importlib.util

from bigmodel.config.deepspeed import deepspeed_config
from bigmodel.config.errors import ConfigError
from bigmodel.config.layout import EMBEDDING_OBJECTIVES, ParallelLayout, active_objectives, dp_shard_for
from bigmodel.config.schema import Config


def validate_config(cfg: Config) -> None:
    """Raise ConfigError (one line: the field and the fix) for the first inconsistency in `cfg`."""
    check_model(cfg)
    check_objectives(cfg)
    check_batch(cfg)
    check_accumulation(cfg)
    check_locked_towers(cfg)
    check_schedule(cfg)
    check_data(cfg)
    check_streaming(cfg)
    check_transform(cfg)
    refuse_unavailable(cfg)
    check_reshard(cfg)
    check_engine(cfg)
    check_fused_kernels(cfg)
    ParallelLayout.from_config(cfg).check_layout(cfg)


def resolve_dp_shard(cfg: Config, world_size: int) -> None:
    """Replace parallel.dp_shard=-1 in `cfg` by what the other axes leave of `world_size` (in place, so the run's
    saved config.yaml records it) and validate the result; ConfigError (one line) where it cannot fit."""
    if cfg.parallel.dp_shard == -1:
        cfg.parallel.dp_shard = dp_shard_for(cfg.parallel, world_size)
        validate_config(cfg)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_model(cfg: Config) -> None:
    m = cfg.model
    if m.image_size % m.patch_size:
        raise ConfigError(
            f"model.patch_size={m.patch_size} does not divide model.image_size={m.image_size}; "
            f"use a patch size among {_divisors(m.image_size)}"
        )
    for tower in ("vision", "text"):
        width, heads = getattr(m, f"{tower}_width"), getattr(m, f"{tower}_heads")
        if width % heads:
            raise ConfigError(
                f"model.{tower}_width={width} is not divisible by model.{tower}_heads={heads}; "
                f"use a head count among {_divisors(width)}"
            )
    if m.fusion == "none" and m.fusion_layers != 0:
        raise ConfigError(
            f"model.fusion_layers={m.fusion_layers} but model.fusion=none has no fusion blocks; "
            "set model.fusion_layers=0 or choose model.fusion=merged|cross"
        )
    if m.fusion != "none" and m.fusion_layers == 0:
        raise ConfigError(f"model.fusion={m.fusion} needs model.fusion_layers >= 1; set it, or use model.fusion=none")


def check_objectives(cfg: Config) -> None:
    w, m = cfg.train.loss_weights, cfg.model
    if not active_objectives(w):
        raise ConfigError("train.loss_weights are all 0, so nothing is trained; give at least one a positive weight")
    if w.contrastive > 0 and w.siglip > 0:
        raise ConfigError(
            "train.loss_weights.contrastive and train.loss_weights.siglip are both > 0, but they are two forms of one "
            "objective on the same embeddings; set one of them to 0"
        )
    if w.caption > 0 and (m.fusion != "cross" or not m.text_causal):
        raise ConfigError(
            f"train.loss_weights.caption > 0 decodes text through causal blocks that cross-attend to the image, but "
            f"model.fusion={m.fusion} and model.text_causal={str(m.text_causal).lower()}; set model.fusion=cross and "
            "model.text_causal=true"
        )
    for name in ("itm", "mlm"):
        if getattr(w, name) > 0 and m.fusion == "none":
            raise ConfigError(
                f"train.loss_weights.{name}={getattr(w, name)} needs fused text, but model.fusion=none; "
                f"set train.loss_weights.{name}=0 or model.fusion=merged|cross"
            )
    if w.mlm > 0 and m.text_causal:
        raise ConfigError(
            "train.loss_weights.mlm > 0 needs bidirectional text attention, but model.text_causal=true; "
            "set model.text_causal=false or train.loss_weights.mlm=0"
        )
    if w.mlm > 0 and cfg.data.mlm_probability == 0:
        raise ConfigError("train.loss_weights.mlm > 0 but data.mlm_probability=0 masks nothing; set it to e.g. 0.15")


def microbatches_per_step(cfg: Config) -> int:
    """How many microbatches a step's global batch is split into: accumulation, or the pipeline's microbatches."""
    return cfg.parallel.microbatches if cfg.parallel.pp > 1 else cfg.train.grad_accum


def check_batch(cfg: Config) -> None:
    t, p = cfg.train, cfg.parallel
    if p.dp_shard == 0:
        raise ConfigError(
            "parallel.dp_shard=0 is invalid: it should be at least 1, or -1 for the processes the other axes leave; "
            "set parallel.dp_shard to a valid value"
        )
    if t.global_batch_size % t.grad_accum:
        raise ConfigError(
            f"train.grad_accum={t.grad_accum} does not divide train.global_batch_size={t.global_batch_size}; "
            f"use one of {_divisors(t.global_batch_size)}"
        )
    if p.pp > 1 and t.grad_accum != 1:
        raise ConfigError(
            f"train.grad_accum={t.grad_accum} with a pipeline: the pipeline's microbatches are the accumulation; "
            "set train.grad_accum=1 and parallel.microbatches instead"
        )
    # dp_shard=-1 is resolved where the world size is known (resolve_dp_shard, which checks again); until then the
    # replicas alone give the necessary conditions.
    dp = p.dp_replicate * max(p.dp_shard, 1)
    accumulation = microbatches_per_step(cfg)
    if t.global_batch_size % accumulation:
        raise ConfigError(
            f"parallel.microbatches={accumulation} does not divide train.global_batch_size={t.global_batch_size}; "
            f"use one of {_divisors(t.global_batch_size)}"
        )
    micro = t.global_batch_size // accumulation
    if micro % dp:
        raise ConfigError(
            f"a microbatch of {micro} samples (train.global_batch_size / train.grad_accum) cannot be split over "
            f"{dp} data-parallel ranks; make train.global_batch_size a multiple of {dp * accumulation}"
        )
    embedding = [name for name in EMBEDDING_OBJECTIVES if getattr(t.loss_weights, name) > 0]
    if embedding and micro < 2:
        raise ConfigError(
            f"the {embedding[0]} loss needs at least 2 samples per microbatch; "
            "raise train.global_batch_size or lower train.grad_accum (parallel.microbatches with a pipeline)"
        )
    # Image-text matching pairs sample i with sample i^1 of the same microbatch as its negative, which keeps the
    # pairs identical in every data-parallel layout as long as each rank's microbatch is even.
    if t.loss_weights.itm > 0 and (micro // dp) % 2:
        raise ConfigError(
            f"image-text matching needs an even microbatch per data-parallel rank, got {micro // dp}; "
            f"make train.global_batch_size a multiple of {2 * dp * accumulation}"
        )


def check_accumulation(cfg: Config) -> None:
    """train.accumulation=cached needs microbatches to accumulate, an embedding objective to cache, and no
    pipeline (whose schedule runs the loss per microbatch)."""
    t = cfg.train
    if t.accumulation != "cached":
        return
    if cfg.parallel.pp > 1:
        raise ConfigError(
            "train.accumulation=cached does not run with a pipeline (parallel.pp > 1): the schedule computes the loss "
            "per microbatch; set parallel.pp=1 or train.accumulation=naive"
        )
    if t.grad_accum == 1:
        raise ConfigError(
            "train.accumulation=cached with train.grad_accum=1 is a no-op (one microbatch is already the whole batch); "
            "raise train.grad_accum or set train.accumulation=naive"
        )
    if not any(getattr(t.loss_weights, name) > 0 for name in EMBEDDING_OBJECTIVES):
        raise ConfigError(
            "train.accumulation=cached caches the contrastive or siglip embeddings, but both weights are 0; "
            "set train.accumulation=naive"
        )


def check_locked_towers(cfg: Config) -> None:
    """Locked towers must leave something to train for every objective, and unlocked_blocks must fit the towers."""
    t, m = cfg.train, cfg.model
    if not (t.lock_image or t.lock_text):
        if t.unlocked_blocks:
            raise ConfigError(
                f"train.unlocked_blocks={t.unlocked_blocks} counts the trainable top blocks of a locked tower, but no "
                "tower is locked; set train.lock_image or train.lock_text, or train.unlocked_blocks=0"
            )
        return
    for tower, locked, layers in (("image", t.lock_image, m.vision_layers), ("text", t.lock_text, m.text_layers)):
        if locked and t.unlocked_blocks >= layers:
            raise ConfigError(
                f"train.unlocked_blocks={t.unlocked_blocks} leaves the whole {tower} tower ({layers} blocks) "
                f"trainable, so train.lock_{tower}=true locks nothing; lower train.unlocked_blocks below {layers}"
            )
    w = t.loss_weights
    if t.lock_text and w.mlm > 0 and t.unlocked_blocks == 0:
        raise ConfigError(
            "train.lock_text=true freezes the text tower that masked LM (train.loss_weights.mlm > 0) trains; "
            "set train.loss_weights.mlm=0, train.lock_text=false or train.unlocked_blocks > 0"
        )
    fused = w.itm > 0 or w.mlm > 0 or w.caption > 0
    if t.lock_image and t.lock_text and t.unlocked_blocks == 0 and not fused:
        objective = "siglip" if w.siglip > 0 else "contrastive"
        raise ConfigError(
            f"train.lock_image and train.lock_text freeze both towers that the {objective} loss trains (only its "
            "projections would learn); unlock one tower (LiT locks the image tower only) or set "
            "train.unlocked_blocks > 0"
        )


def check_schedule(cfg: Config) -> None:
    t = cfg.train
    if t.warmup_steps >= t.steps:
        raise ConfigError(
            f"train.warmup_steps={t.warmup_steps} must be below train.steps={t.steps}; lower it (e.g. to "
            f"{max(0, t.steps // 10)})"
        )
    for field in ("profile_step", "pp_timeline_step"):
        if getattr(cfg.log, field) > t.steps:
            raise ConfigError(
                f"log.{field}={getattr(cfg.log, field)} is after the last step (train.steps={t.steps}); choose a step "
                f"from 1 to {t.steps}, or 0 for none"
            )


def check_data(cfg: Config) -> None:
    d = cfg.data
    if d.source == "shards" and not d.train_shards:
        raise ConfigError(
            "data.source=shards needs data.train_shards, e.g. data/shapes/train-{000000..000009}.tar "
            "(bigmodel data make-shapes writes such shards)"
        )


def check_streaming(cfg: Config) -> None:
    """The streaming mode's fields: weights one per `::` source and positive, streaming settings only where shards
    are streamed (data.mode=auto resolves against the shard locations when the loader is built), num_workers
    dividing streams."""
    d = cfg.data
    if d.source == "shapes":
        for field, bad, value in (("mode", d.mode == "streaming", d.mode), ("resampled", d.resampled, d.resampled)):
            if bad:
                raise ConfigError(
                    f"data.{field}={value} streams shards, but data.source=shapes; set data.source=shards"
                )
    sources = len(d.train_shards.split("::"))  # the source separator of bigmodel.data.locations
    if d.train_weights and (d.source == "shapes" or len(d.train_weights) != sources):
        raise ConfigError(
            f"data.train_weights has {len(d.train_weights)} weights but data.train_shards has "
            f"{sources if d.source == 'shards' else 0} '::'-joined sources; give one weight per source"
        )
    if any(weight <= 0 for weight in d.train_weights):
        raise ConfigError(f"data.train_weights={d.train_weights} has a weight <= 0; drop that source instead")
    if d.mode == "indexed" and (d.train_weights or d.resampled):
        field = "data.train_weights" if d.train_weights else "data.resampled"
        raise ConfigError(f"{field} needs data.mode=streaming (data.mode=indexed reads a fixed order); set it")
    if d.streams and d.num_workers and d.streams % d.num_workers:
        raise ConfigError(
            f"data.num_workers={d.num_workers} must divide data.streams={d.streams} (each worker runs whole readers); "
            f"use one of {_divisors(d.streams)} workers"
        )


def check_transform(cfg: Config) -> None:
    """data.crop_scale is a (min, max) area fraction in (0, 1]; data.image_mean and data.image_std hold one positive
    std and one mean per channel (3, or 1 for grey, which data.transform=clip checks against model.channels)."""
    d, channels = cfg.data, cfg.model.channels
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise ConfigError(
            f"data.crop_scale={d.crop_scale} must be two area fractions 0 < min <= max <= 1; "
            "e.g. data.crop_scale=[0.9,1.0]"
        )
    if len(d.image_mean) not in (1, 3) or len(d.image_std) != len(d.image_mean):
        raise ConfigError(
            f"data.image_mean has {len(d.image_mean)} values and data.image_std {len(d.image_std)}; give both 3 "
            "values (RGB) or both 1 (grey)"
        )
    if d.transform == "clip" and len(d.image_mean) != channels:
        example = "[0.5]" if channels == 1 else "[0.5,0.5,0.5]"
        raise ConfigError(
            f"data.image_mean and data.image_std have {len(d.image_mean)} values but model.channels={channels}; "
            f"data.transform=clip normalises each channel: give one value per channel, e.g. "
            f"data.image_mean={example} data.image_std={example}"
        )
    if any(std <= 0 for std in d.image_std):
        raise ConfigError(f"data.image_std={d.image_std} has a value <= 0; every standard deviation must be positive")


def refuse_unavailable(cfg: Config) -> None:
    """Refuse values whose implementation has not landed yet, rather than silently ignoring them."""
    p = cfg.parallel
    if p.microbatches != 1 and p.pp == 1:
        raise ConfigError(
            f"parallel.microbatches={p.microbatches} applies to pipelines (parallel.pp > 1); "
            "use train.grad_accum to split a step into microbatches without one"
        )


def check_reshard(cfg: Config) -> None:
    """parallel.reshard_after_forward=false is a native-engine setting (ZeRO 0-2 keep whole parameters anyway)."""
    if not cfg.parallel.reshard_after_forward and cfg.engine == "deepspeed":
        raise ConfigError(
            "parallel.reshard_after_forward=false applies to the native engine; DeepSpeed ZeRO-3 keeps gathered "
            "parameters for backward by default (stage3_max_reuse_distance, in deepspeed.config_file)"
        )


def check_fused_kernels(cfg: Config) -> None:
    """model.cpu_fused_kernels runs the blocks' linear weights without calling the nn.Linear modules: refused where
    something must act through those modules (tensor parallelism's DTensor plans, DeepSpeed ZeRO-3's gathering
    hooks) or fuses them itself (inductor)."""
    if not cfg.model.cpu_fused_kernels:
        return
    p = cfg.parallel
    refused = [
        ("parallel.tp", p.tp, p.tp > 1, "tensor-parallel layers must be called as modules"),
        (
            "parallel.zero_stage",
            p.zero_stage,
            cfg.engine == "deepspeed" and p.zero_stage == 3,
            "DeepSpeed ZeRO-3 gathers parameters in module hooks",
        ),
        ("train.compile", cfg.train.compile, cfg.train.compile, "inductor fuses the plain modules itself"),
    ]
    for field, value, bad, why in refused:
        if bad:
            raise ConfigError(
                f"{field}={value} is not supported with model.cpu_fused_kernels=true ({why}); "
                "set model.cpu_fused_kernels=false"
            )


def check_engine(cfg: Config) -> None:
    """engine=deepspeed: data parallel (ZeRO 0-3) over every process, no tensor or pipeline parallelism, and the
    DeepSpeed config bigmodel generates (with deepspeed.config_file merged in) free of conflicts."""
    if cfg.engine != "deepspeed":
        return
    p, t, d = cfg.parallel, cfg.train, cfg.deepspeed
    refused = [
        ("parallel.pp", p.pp, p.pp > 1, "pipelines run under engine=native; set parallel.pp=1 or engine=native"),
        ("parallel.tp", p.tp, p.tp > 1, "tensor parallelism runs under engine=native; set parallel.tp=1"),
        (
            "parallel.dp_replicate",
            p.dp_replicate,
            p.dp_replicate > 1,
            "DeepSpeed shards over all data-parallel ranks; set parallel.dp_shard to the process count and "
            "dp_replicate=1, or use engine=native for HSDP",
        ),
        ("train.compile", t.compile, t.compile, "set train.compile=false, or engine=native to compile"),
        (
            "parallel.gloo_transport",
            p.gloo_transport,
            p.gloo_transport,
            "it replaces the native engine's collectives; set parallel.gloo_transport=false",
        ),
        (
            "checkpoint.async_save",
            cfg.checkpoint.async_save,
            cfg.checkpoint.async_save,
            "DeepSpeed writes its checkpoints synchronously; set checkpoint.async_save=false",
        ),
    ]
    for field, value, bad, fix in refused:
        if bad:
            raise ConfigError(f"{field}={value} is not supported with engine=deepspeed: {fix}")
    if d.offload_param and p.zero_stage != 3:
        raise ConfigError(
            f"deepspeed.offload_param=true needs parallel.zero_stage=3 (got {p.zero_stage}); set zero_stage=3 "
            "or offload_param=false"
        )
    if d.offload_optimizer and p.zero_stage == 0:
        raise ConfigError(
            "deepspeed.offload_optimizer=true needs parallel.zero_stage 1-3 (got 0); raise zero_stage or set "
            "offload_optimizer=false"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("engine=deepspeed needs the deepspeed package: pip install 'bigmodel[deepspeed]'")
    if p.dp_shard != -1:  # the micro-batch size needs the data-parallel size: checked again once resolved
        deepspeed_config(cfg)
