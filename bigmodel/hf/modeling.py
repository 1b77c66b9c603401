"""`BigmodelConfig` / `BigmodelModel`: the MultimodalEncoder behind transformers' PretrainedConfig / PreTrainedModel
interface, so that `save_pretrained`, `from_pretrained` and the Auto classes work without custom code files."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from bigmodel.config.schema import ModelConfig
from bigmodel.models.encoder import DEFAULT_OBJECTIVES, MultimodalEncoder
from bigmodel.models.init import init_weights

MODEL_TYPE = "bigmodel_encoder"


class BigmodelConfig(PretrainedConfig):
    """`model`: the fields of bigmodel's ModelConfig (as a dict); `objectives`: the heads the model has."""

    model_type = MODEL_TYPE

    def __init__(self, model: dict[str, Any] | None = None, objectives: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.model = dict(model or {})
        self.objectives = list(objectives or DEFAULT_OBJECTIVES)

    def model_config(self) -> ModelConfig:
        """The validated bigmodel ModelConfig (a one-line ConfigError names a bad field)."""
        return ModelConfig(**self.model)


class BigmodelModel(PreTrainedModel):
    """The MultimodalEncoder (as `self.encoder`, under bigmodel's own parameter names) with its heads.

    `forward` takes the batch keys bigmodel's data produces and returns what MultimodalEncoder.forward returns (a
    dict: image_embeds, text_embeds, logit_scale, itm_logits, itm_labels, mlm_logits, mlm_labels, per objective).
    """

    config_class = BigmodelConfig
    base_model_prefix = "encoder"
    main_input_name = "pixel_values"

    def __init__(self, config: BigmodelConfig):
        super().__init__(config)
        self.encoder = MultimodalEncoder(config.model_config(), config.objectives)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """bigmodel's seeded initialisation, once for the whole encoder (weights loaded afterwards replace it)."""
        if module is self.encoder and not any(p.is_meta for p in module.parameters()):
            init_weights(module, seed=0, device=next(module.parameters()).device)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """pixel_values (B, C, H, W), input_ids and attention_mask (B, L); for the MLM head, mlm_input_ids (the
        masked captions) and mlm_labels (-100 where not predicted); without them nothing is predicted."""
        batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        if "mlm" in self.encoder.objectives:
            batch["mlm_input_ids"] = input_ids if mlm_input_ids is None else mlm_input_ids
            batch["mlm_labels"] = torch.full_like(input_ids, -100) if mlm_labels is None else mlm_labels
        return self.encoder(batch)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower's class token (B, Dv), normalised: what a downstream head reads."""
        return self.encoder.vision(pixel_values)[:, 0]


def register() -> None:
    """Make AutoConfig and AutoModel know the "bigmodel_encoder" model type (safe to call more than once)."""
    try:
        AutoConfig.register(MODEL_TYPE, BigmodelConfig)
        AutoModel.register(BigmodelConfig, BigmodelModel)
    except ValueError:  # already registered
        pass
