"""Typed configuration sections.

Every section is a pydantic dataclass: fields are typed, range-checked on construction and documented by the
docstring under each field (that text is what `docs/configuration.md` shows; a test keeps the two in sync).
Checks that involve several fields live in `bigmodel.config.validate`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

SECTION_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

Fusion = Literal["none", "merged", "cross"]
Activation = Literal["quick_gelu", "gelu", "gelu_tanh"]
Precision = Literal["fp32", "bf16"]
Engine = Literal["native", "deepspeed"]
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"]
WandbMode = Literal["offline", "online", "disabled"]


@dataclass(config=SECTION_CONFIG)
class ModelConfig:
    """The multimodal encoder: image tower (ViT), text tower, fusion stack and heads."""

    image_size: int = Field(32, ge=8)
    """Input image side in pixels (images are square)."""
    patch_size: int = Field(8, ge=1)
    """ViT patch side in pixels; must divide image_size."""
    channels: int = Field(3, ge=1)
    """Image channels."""
    vision_width: int = Field(64, ge=8)
    """Hidden size of the image tower."""
    vision_layers: int = Field(2, ge=1)
    """Number of Transformer blocks in the image tower."""
    vision_heads: int = Field(4, ge=1)
    """Attention heads in the image tower; must divide vision_width."""
    vision_mlp_dim: int = Field(256, ge=1)
    """Inner size of the image tower's MLP."""
    vocab_size: int = Field(128, ge=8)
    """Token vocabulary size; must be at least the tokenizer's vocabulary size."""
    context_length: int = Field(32, ge=4)
    """Maximum caption length in tokens, special tokens included."""
    text_width: int = Field(64, ge=8)
    """Hidden size of the text tower (and of the fusion stack)."""
    text_layers: int = Field(2, ge=1)
    """Number of Transformer blocks in the text tower."""
    text_heads: int = Field(4, ge=1)
    """Attention heads in the text tower and the fusion stack; must divide text_width."""
    text_mlp_dim: int = Field(256, ge=1)
    """Inner size of the text tower's (and fusion stack's) MLP."""
    text_causal: bool = False
    """Causal self-attention in the text tower (CLIP's text encoder). Masked LM needs it off."""
    embed_dim: int = Field(64, ge=1)
    """Size of the shared image-text embedding space of the contrastive head."""
    fusion: Fusion = "cross"
    """How the modalities meet: none (dual encoder, contrastive only), merged (image and text tokens
    concatenated through shared blocks), cross (text blocks cross-attend to image tokens)."""
    fusion_layers: int = Field(2, ge=0)
    """Number of fusion blocks; must be 0 when fusion is none and at least 1 otherwise."""
    activation: Activation = "gelu"
    """MLP activation; quick_gelu matches OpenAI CLIP checkpoints."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability on attention outputs and MLP outputs."""
    norm_eps: float = Field(1e-5, gt=0.0)
    """LayerNorm epsilon."""
    init_std: float = Field(0.02, gt=0.0)
    """Standard deviation of the normal initialisation of weight matrices and embeddings."""
    logit_scale_init: float = 2.6592
    """Initial log of the contrastive logit scale (ln(1/0.07), CLIP's value)."""
    logit_scale_max: float = Field(4.6052, gt=0.0)
    """The logit scale is clamped to exp(logit_scale_max) (100, CLIP's value)."""
    siglip_logit_scale_init: float = 2.302585
    """Initial log of the SigLIP logit scale (ln 10, the paper's value); used with train.loss_weights.siglip > 0."""
    siglip_logit_bias_init: float = -10.0
    """Initial SigLIP logit bias (the paper's -10: every pair starts near "no match", as almost all are negatives)."""
    patch_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """FLIP's patch dropout: the fraction of image patches dropped before the image tower's blocks in training
    (the class token is always kept; evaluation sees every patch). Each sample keeps max(1, int(N (1 - p))) of
    its N patches, drawn from its seeded generator (the one its augmentation uses), so every parallel layout and
    worker count drops the same ones. 0: off."""
    cpu_fused_kernels: bool = False
    """Run quick_gelu MLPs and attention projections through hand-fused autograd functions tuned for CPU training
    (bigmodel/models/fused.py; docs/benchmarks.md). They bypass the inner nn.Linear modules, so hooks on those do
    not fire; refused with parallel.tp > 1, DeepSpeed ZeRO-3 and train.compile."""


KERNEL_FIELDS = ("cpu_fused_kernels",)
"""ModelConfig fields that choose how the model computes, not what: the parameters and outputs are the same either
way, so a checkpoint resumes whatever they were when it was saved."""


@dataclass(config=SECTION_CONFIG)
class DataConfig:
    """Where samples come from and how they are turned into tensors."""

    source: Literal["shapes", "shards"] = "shapes"
    """shapes: the embedded procedurally generated dataset (no files needed); shards: WebDataset tar shards."""
    train_shards: str = ""
    """With source shards: the training shards. A brace pattern such as data/train-{000000..000009}.tar, on local
    disk, s3://bucket/prefix/..., http(s)://... or pipe:COMMAND (WebDataset's convention); several sources joined
    by `::` (OpenCLIP's convention), mixed by train_weights."""
    eval_shards: str = ""
    """With source shards: the held-out shards (same syntax, sources joined by `::` are read one after another);
    empty means no evaluation."""
    mode: Literal["auto", "indexed", "streaming"] = "auto"
    """indexed: random access to every sample through per-shard indexes (any rank reads any sample; exact resume in
    any layout); streaming: shards dealt to (rank, worker) and read sequentially through a shuffle buffer (exact
    resume in the same layout); auto: indexed when every shard is a local file, streaming otherwise."""
    index_dir: str = ""
    """indexed mode: the folder (local or remote) of the per-shard indexes written by `bigmodel data index`; empty:
    beside each shard."""
    train_weights: list[float] = Field(default_factory=list)
    """streaming mode: one positive weight per `::`-joined training source, multiplying the chance of each of its
    shards (OpenCLIP's --train-data-upsampling-factors): source i supplies w_i * n_i / sum_j w_j * n_j of the shards
    read (n: shard counts); empty: every shard alike. The indexed mode refuses weights."""
    resampled: bool = False
    """streaming mode: draw shards with replacement, independently per (rank, worker) (OpenCLIP's
    --dataset-resampled); false: each epoch deals every shard once."""
    shuffle_buffer: int = Field(1000, ge=1)
    """streaming mode: samples held per (rank, worker) and drawn from at random (1: no shuffling)."""
    caption_key: str = "txt"
    """The caption: txt (the KEY.txt member) or the name of a field of the KEY.json member (img2dataset's
    metadata)."""
    retries: int = Field(5, ge=0)
    """Remote reads: attempts after the first on a transient error (timeouts, 5xx, throttling), with exponential
    backoff; a shard still unreachable is an error naming its URL and the status."""
    tokenizer: str = "builtin"
    """builtin: the tokenizer shipped for the embedded dataset; otherwise a tokenizers tokenizer.json file or a
    transformers tokenizer folder (tokenizer.json, or vocab.json + merges.txt). Its BOS, EOS, PAD and MASK tokens
    are read from it as transformers does; EOS is required, PAD falls back to EOS, MASK is needed only when
    train.loss_weights.mlm > 0."""
    train_size: int = Field(100_000, ge=1)
    """With source shapes: number of distinct training samples (an epoch)."""
    eval_size: int = Field(512, ge=1)
    """With source shapes: number of held-out samples (drawn from a separate, fixed stream)."""
    max_shapes: int = Field(2, ge=1, le=4)
    """With source shapes: at most this many shapes per image."""
    mlm_probability: float = Field(0.15, ge=0.0, le=1.0)
    """Fraction of caption tokens selected for masked language modelling (80% mask, 10% random, 10% kept)."""
    transform: Literal["shapes", "clip"] = "shapes"
    """shapes: images resized to model.image_size without cropping, scaled to [-1, 1], with the caption-preserving
    augmentation of `augment`; clip: OpenCLIP's preprocessing (training: random resized crop with crop_scale,
    bicubic; evaluation: resize of the shortest side and centre crop), normalised with image_mean and image_std."""
    crop_scale: list[float] = Field(default_factory=lambda: [0.9, 1.0])
    """transform clip: the (min, max) fraction of the image area a training crop covers (OpenCLIP's default)."""
    image_mean: list[float] = Field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    """transform clip: per-channel mean subtracted after scaling to [0, 1] (OpenAI CLIP's)."""
    image_std: list[float] = Field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    """transform clip: per-channel standard deviation divided by after the mean (OpenAI CLIP's)."""
    augment: bool = True
    """Training images augmented. transform shapes: caption-preserving jitter (brightness, contrast, pixel noise;
    never flips or crops, since captions name positions); transform clip: random resized crops (false: training
    uses the evaluation transform, resize and centre crop)."""
    ledger: bool = True
    """Record the sample ids of every step (per rank, under the run's ledger/ folder) and their hash in checkpoints,
    for `bigmodel data audit`."""
    num_workers: int = Field(0, ge=0)
    """Background processes that prepare batches (0: in the training process)."""
    streams: int = Field(0, ge=0)
    """streaming mode: shard readers per data-parallel rank, each with its own shuffle buffer, building whole local
    batches in turn (0: one per worker, data.num_workers or 1). Batches depend on it, not on num_workers, which
    must divide it; a resume continues exactly only with the same dp size and streams."""


@dataclass(config=SECTION_CONFIG)
class ParallelConfig:
    """The parallel layout. dp_replicate * dp_shard * tp * pp must equal the number of processes."""

    dp_replicate: int = Field(1, ge=1)
    """Data-parallel replicas (the replicated axis of HSDP)."""
    dp_shard: int = Field(1, ge=-1)
    """Data-parallel ranks over which ZeRO shards state (the sharded axis of HSDP), at least 1; -1: the processes that
    dp_replicate x tp x pp leave, resolved when the job starts (and written into the run's config.yaml)."""
    tp: int = Field(1, ge=1)
    """Tensor-parallel degree (heads, MLP width and vocabulary split across ranks)."""
    pp: int = Field(1, ge=1)
    """Pipeline-parallel stages."""
    sp: bool = False
    """Sequence parallelism on the norm and dropout regions (needs tp > 1)."""
    zero_stage: int = Field(0, ge=0, le=3)
    """0: replicated; 1: optimizer state sharded; 2: + gradients; 3: + parameters (FSDP)."""
    reshard_after_forward: bool = True
    """ZeRO-3 (native engine): free each Transformer block's gathered parameters after its forward and gather them
    again for its backward; false keeps them until the block's backward: one all-gather per block and step instead
    of two, but the whole unsharded model is held from forward to backward (what DeepSpeed ZeRO-3 does by default,
    through stage3_max_reuse_distance). Stages 0-2 keep whole parameters either way."""
    gloo_transport: bool = False
    """Native engine on the gloo backend (CPU): move ZeRO's and FSDP2's all-gathers, reduce-scatters and all-reduces
    through shared memory between the ranks of a host, or point-to-point messages, instead of gloo's own (faster:
    docs/benchmarks.md), and with reshard_after_forward=false make each ZeRO-3 block stack one FSDP unit; false:
    torch's collectives and one unit per block."""
    pp_schedule: PipelineSchedule = "1f1b"
    """Pipeline schedule (with pp > 1)."""
    microbatches: int = Field(1, ge=1)
    """Pipeline microbatches per step (with pp > 1; replaces train.grad_accum, which must then be 1)."""
    pp_virtual_stages: int = Field(2, ge=1)
    """Pipeline stages per rank for the interleaved_1f1b and zero_bubble schedules (gpipe and 1f1b use 1)."""
    pp_layers: list[int] = Field(default_factory=list)
    """Transformer blocks per pipeline stage, in forward order over the image tower, text tower and fusion stack
    (one entry per stage, summing to all blocks); empty: split automatically so stages have balanced FLOPs."""


@dataclass(config=SECTION_CONFIG)
class LossWeights:
    """Weights of the pretraining objectives in the total loss. A weight of 0 skips that head entirely."""

    contrastive: float = Field(1.0, ge=0.0)
    """Image-text contrastive loss (InfoNCE, symmetric, learnable temperature)."""
    itm: float = Field(1.0, ge=0.0)
    """Image-text matching loss (binary; each image also paired with another caption of its batch)."""
    mlm: float = Field(1.0, ge=0.0)
    """Masked language modelling loss on the fused text."""
    siglip: float = Field(0.0, ge=0.0)
    """SigLIP's sigmoid pairwise loss (learnable logit scale and bias); an alternative to contrastive, not an
    addition (choose one of the two)."""
    caption: float = Field(0.0, ge=0.0)
    """CoCa's captioning loss: next-token prediction on the text decoded through causal text blocks that
    cross-attend to the image tokens (needs model.text_causal=true and model.fusion=cross)."""


@dataclass(config=SECTION_CONFIG)
class TrainConfig:
    """The optimisation loop."""

    steps: int = Field(100, ge=1)
    """Optimizer steps to run."""
    seed: int = Field(0, ge=0)
    """Seed of weights, data order, augmentation and masking. Same seed, same run, in any layout."""
    global_batch_size: int = Field(32, ge=1)
    """Samples per optimizer step, over all data-parallel ranks and accumulation steps."""
    grad_accum: int = Field(1, ge=1)
    """Microbatches accumulated per optimizer step; must divide global_batch_size."""
    precision: Precision = "fp32"
    """fp32, or bf16 autocast (fp32 master weights, reductions and optimizer state)."""
    out_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, eval.jsonl and checkpoints/ go here."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The cosine schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps (from 0 to lr); must be below steps."""
    weight_decay: float = Field(0.05, ge=0.0)
    """AdamW weight decay, applied to weight matrices only (not to norms, biases, embeddings' positions,
    class token or logit scale)."""
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""
    beta2: float = Field(0.98, ge=0.0, lt=1.0)
    """AdamW beta2."""
    eps: float = Field(1e-6, gt=0.0)
    """AdamW epsilon."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    """Weights of the objectives in the total loss."""
    siglip_exchange: Literal["gather", "ring"] = "gather"
    """How SigLIP sees the other data-parallel ranks' texts: gather (all-gather with gradient; each rank holds
    local x global logits) or ring (texts passed around the data-parallel ranks, one local x local block at a
    time, as OpenCLIP's neighbour exchange). Same loss and gradients either way."""
    accumulation: Literal["naive", "cached"] = "naive"
    """How train.grad_accum microbatches make one step: naive (each microbatch's loss on its own, so contrastive
    and SigLIP see only a microbatch's negatives) or cached (GradCache: embed every microbatch without a graph,
    take the whole batch's contrastive/SigLIP loss and its gradient w.r.t. the embeddings, then re-run each
    microbatch with its embedding gradient: exactly the loss and gradients of one large batch, with one
    microbatch's activation memory, for about one more forward pass)."""
    lock_image: bool = False
    """Freeze the image tower and its contrastive projection (LiT): no gradient, no optimizer state, no weight
    decay; its top train.unlocked_blocks blocks, post-norm and projection stay trainable when unlocked_blocks > 0."""
    lock_text: bool = False
    """Freeze the text tower and its contrastive projection likewise (its top train.unlocked_blocks blocks, final
    norm and projection stay trainable when unlocked_blocks > 0)."""
    unlocked_blocks: int = Field(0, ge=0)
    """With train.lock_image or train.lock_text: how many of a locked tower's top blocks (with its final norm and
    projection) still train (0: the whole tower and its projection are frozen)."""
    activation_checkpointing: bool = False
    """Recompute each Transformer block's activations in backward (less memory, about a third more compute)."""
    compile: bool = False
    """torch.compile the Transformer blocks one by one (the whole model under tensor parallelism, where per-block
    compile fails in torch 2.13). The first steps are slower while kernels compile."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile backend: inductor generates fused kernels (needs a C++ compiler on CPU); aot_eager and eager
    trace without generating code (for debugging)."""
    deterministic: bool = False
    """Deterministic algorithms only (bit-identical reruns; may be slower)."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the held-out split every this many steps (0: only before and after training)."""
    eval_batch_size: int = Field(128, ge=1)
    """Batch size for evaluation."""
    threads: int = Field(0, ge=0)
    """torch intra-op threads per process (0: the CPU cores available to this process divided by the
    processes on this node)."""


@dataclass(config=SECTION_CONFIG)
class CheckpointConfig:
    """When and where checkpoints are written."""

    every: int = Field(0, ge=0)
    """Save every this many steps (0: only at the end)."""
    keep: int = Field(2, ge=1)
    """Keep the newest this many checkpoints."""
    save_final: bool = True
    """Save a checkpoint when training ends."""
    save_on_signal: bool = True
    """On SIGUSR1 or SIGTERM (a scheduler's warning before preemption or the time limit), finish the current
    step, save a checkpoint, write stopped.json into the run directory and exit with status 0; resume with
    `--resume auto`."""
    async_save: bool = False
    """Write checkpoints in a background thread while training goes on. The state is first copied into host
    memory (one extra copy of this rank's model and optimizer state); the manifest and `latest` follow once every
    rank's files are written."""
    resume: str = ""
    """Resume training: "auto" (the newest complete checkpoint in train.out_dir, or a fresh start if there is
    none) or the path of a checkpoint or run directory; empty: start fresh. Also `bigmodel train --resume ...`."""


@dataclass(config=SECTION_CONFIG)
class LogConfig:
    """What is reported, where and how often."""

    every: int = Field(10, ge=1)
    """Log metrics every this many steps (and at the last step)."""
    wandb: WandbMode = "offline"
    """Weights & Biases mode: offline (files under out_dir/wandb, no network), online (needs WANDB_API_KEY;
    falls back to offline without one) or disabled."""
    wandb_project: str = "bigmodel"
    """Weights & Biases project name."""
    run_name: str = ""
    """Run name for logs (empty: the basename of train.out_dir)."""
    progress: bool = True
    """Show a progress bar with ETA on rank 0."""
    pp_timeline_step: int = Field(0, ge=0)
    """With a pipeline: record this step's per-stage forward/backward times (0: never; use 2 or later, the first
    step also infers shapes) and write timeline.png and timeline.json (Chrome trace) into the run directory."""
    pp_timeline_steps: int = Field(1, ge=1)
    """How many consecutive steps to record from log.pp_timeline_step; timeline_summary.json lists each step's idle
    fraction and reports their median (the picture and trace show the median step)."""
    profile_step: int = Field(0, ge=0)
    """Profile this step and the next log.profile_steps - 1 with torch.profiler (0: never; the first steps are slower
    than the rest, so 3 or later): a trace (Chrome / Perfetto) and a per-operator table per rank in
    <out_dir>/profile/."""
    profile_steps: int = Field(1, ge=1)
    """How many consecutive steps log.profile_step profiles."""


@dataclass(config=SECTION_CONFIG)
class DeepSpeedConfig:
    """Settings of the DeepSpeed engine (engine: deepspeed); the rest comes from train.* and parallel.*."""

    config_file: str = ""
    """Path of a DeepSpeed JSON config merged over the one bigmodel generates: keys bigmodel does not set are
    added, its tuning keys (bucket sizes, persistence threshold, overlap_comm, ...) are replaced, and a key bigmodel
    derives from its own fields (batch sizes, accumulation, clipping, ZeRO stage, precision, offload devices) must
    hold the same value or loading the config fails naming both; optimizer and scheduler sections are refused."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the fp32 master weights and the optimizer state in CPU memory and run the optimizer
    update there (ZeRO stage 1-3). The update is torch.optim.AdamW's, as in every other layout."""
    offload_param: bool = False
    """Keep the parameters in CPU memory between uses (ZeRO stage 3 only)."""
    bucket_size: int = Field(10_000_000, ge=1)
    """Elements per communication bucket: DeepSpeed's reduce_bucket_size, allgather_bucket_size and
    stage3_prefetch_bucket_size. Its own default (5e8) allocates about 2 GB of buffers per rank."""
    param_persistence_threshold: int = Field(100_000, ge=0)
    """ZeRO-3: parameters with fewer elements than this stay whole on every rank instead of being partitioned
    (stage3_param_persistence_threshold); 0 partitions every parameter."""


@dataclass(config=SECTION_CONFIG)
class Config:
    """A whole run."""

    engine: Engine = "native"
    """Training engine: native (torch.distributed: every layout) or deepspeed (ZeRO 0-3 with optional CPU offload
    over data-parallel ranks; see docs/engines.md)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model: towers, fusion and heads."""
    data: DataConfig = Field(default_factory=DataConfig)
    """The data: source, tokenizer, augmentation and masking."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """The parallel layout: data, tensor and pipeline parallel degrees, ZeRO stage."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The optimisation loop: steps, batch, optimizer, schedule, precision."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """When checkpoints are saved and how many are kept."""
    log: LogConfig = Field(default_factory=LogConfig)
    """What is logged, where and how often."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """Settings of the DeepSpeed engine (used with engine: deepspeed only)."""
