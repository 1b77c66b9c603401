"""Locked towers (LiT and fine-tuning recipes): which parameters train.lock_image / train.lock_text freeze.

As OpenCLIP's lock_image_tower / lock_text_tower: a locked tower is frozen whole, its projection in the contrastive
head included; with train.unlocked_blocks = n > 0 its top n blocks, its final norm and its projection still train.
The logit scale and bias, the fusion stack and the heads always train. The decision is by parameter name (those of
`MultimodalEncoder`), so it holds for the whole model and for any pipeline stage of it, which keeps the unsplit
model's names and block indices.
"""

from __future__ import annotations

from bigmodel.config.schema import ModelConfig, TrainConfig
from bigmodel.models.encoder import MultimodalEncoder

TOWERS = {
    # tower prefix: (train flag, config field of its block count, final norm, projection in the contrastive head)
    "vision": ("lock_image", "vision_layers", "vision.post_norm.", "contrastive.visual_projection."),
    "text": ("lock_text", "text_layers", "text.final_norm.", "contrastive.text_projection."),
}


def is_frozen(name: str, model: ModelConfig, train: TrainConfig) -> bool:
    """Whether the parameter `name` (a MultimodalEncoder name) is frozen under train.lock_image / lock_text."""
    for prefix, (flag, layers_field, final_norm, projection) in TOWERS.items():
        if not getattr(train, flag) or not (name.startswith(f"{prefix}.") or name.startswith(projection)):
            continue
        n = train.unlocked_blocks
        if n == 0:
            return True
        top = range(getattr(model, layers_field) - n, getattr(model, layers_field))
        unlocked = (final_norm, projection, *(f"{prefix}.blocks.layers.{i}." for i in top))
        return not name.startswith(unlocked)
    return False


def lock_towers(model: MultimodalEncoder, train: TrainConfig) -> list[str]:
    """Freeze (requires_grad=False) the parameters of `model` (the encoder or a pipeline stage of it) that
    `is_frozen` names, in place, and return their names.

    Apply before anything that reads requires_grad: FSDP2's fully_shard, the optimizer, DeepSpeed's initialize.
    """
    frozen = [name for name, _ in model.named_parameters() if is_frozen(name, model.cfg, train)]
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return frozen
