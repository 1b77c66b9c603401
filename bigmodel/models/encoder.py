"""The multimodal encoder: ViT image tower, Transformer text tower, fusion stack and pretraining heads.

Read top to bottom: towers, fusion, heads, then `MultimodalEncoder`, whose forward returns what the losses in
`bigmodel.losses` need. With fusion `none` the towers, projections and logit scale map one to one onto
transformers' CLIPModel (see `bigmodel.checkpoint.hf`).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from bigmodel.config.schema import ModelConfig
from bigmodel.models.layers import ACTIVATIONS, block_stack

OBJECTIVES = ("contrastive", "itm", "mlm")


def padding_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, T), True where query t may attend key s, from a (B, T) 0/1 token mask."""
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    if not causal:
        return keys
    t = attention_mask.shape[1]
    lower = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    return keys & lower  # (B, 1, T, T)


class VisionTower(nn.Module):
    """ViT: patch embedding, class token, learned positions, pre-LN blocks; outputs every token, normalised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        width = cfg.vision_width
        self.patch_embedding = nn.Conv2d(cfg.channels, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.position_embedding = nn.Parameter(torch.empty(num_positions, width))
        self.pre_norm = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.blocks = block_stack(
            width, cfg.vision_heads, cfg.vision_mlp_dim, cfg.vision_layers, cfg.activation, cfg.dropout, cfg.norm_eps
        )
        self.post_norm = nn.LayerNorm(width, eps=cfg.norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> tokens (B, 1 + N, Dv); token 0 is the class token."""
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, Dv)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (B, 1, Dv)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding
        x = self.blocks(self.pre_norm(x))
        return self.post_norm(x)


class TextTower(nn.Module):
    """Transformer over token ids with learned positions; causal or bidirectional; outputs every token, normalised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.causal = cfg.text_causal
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.position_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.blocks = block_stack(
            cfg.text_width, cfg.text_heads, cfg.text_mlp_dim, cfg.text_layers, cfg.activation, cfg.dropout, cfg.norm_eps
        )
        self.final_norm = nn.LayerNorm(cfg.text_width, eps=cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, L) -> tokens (B, L, Dt)."""
        x = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        x = self.blocks(x, mask=padding_mask(attention_mask, self.causal))
        return self.final_norm(x)


class Fusion(nn.Module):
    """Joins text tokens with image tokens: `merged` (concatenated through shared self-attention blocks) or
    `cross` (text blocks that cross-attend to the image tokens). Returns the fused text tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.fusion
        width = cfg.text_width
        self.image_proj = nn.Linear(cfg.vision_width, width)
        if self.kind == "merged":
            self.modality_embedding = nn.Parameter(torch.empty(2, width))  # row 0 text, row 1 image
        self.blocks = block_stack(
            width,
            cfg.text_heads,
            cfg.text_mlp_dim,
            cfg.fusion_layers,
            cfg.activation,
            cfg.dropout,
            cfg.norm_eps,
            cross=self.kind == "cross",
        )
        self.norm = nn.LayerNorm(width, eps=cfg.norm_eps)

    def forward(self, text: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text (B, L, Dt), attention_mask (B, L), image (B, N, Dv) -> fused text (B, L, Dt)."""
        image = self.image_proj(image)  # (B, N, Dt)
        if self.kind == "cross":
            x = self.blocks(text, mask=padding_mask(attention_mask, causal=False), context=image)
            return self.norm(x)
        length = text.shape[1]
        x = torch.cat([text + self.modality_embedding[0], image + self.modality_embedding[1]], dim=1)
        image_keys = attention_mask.new_ones(image.shape[:2])
        x = self.blocks(x, mask=padding_mask(torch.cat([attention_mask, image_keys], dim=1), causal=False))
        return self.norm(x[:, :length])


class ContrastiveHead(nn.Module):
    """Projections into the shared embedding space and the learnable logit scale (inverse temperature)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.visual_projection = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        # Shape (1,), not a scalar: FSDP2 shards parameters along dim 0. CLIPModel stores it as a scalar.
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.logit_scale_max = cfg.logit_scale_max

    def forward(self, image_pooled: torch.Tensor, text_pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        image = nn.functional.normalize(self.visual_projection(image_pooled), dim=-1)  # (B, E)
        text = nn.functional.normalize(self.text_projection(text_pooled), dim=-1)  # (B, E)
        scale = self.logit_scale.clamp(max=self.logit_scale_max).exp()
        return {"image_embeds": image, "text_embeds": text, "logit_scale": scale}


class MaskedLMHead(nn.Module):
    """BERT-style transform (dense, activation, LayerNorm) and a decoder to vocabulary logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_width)
        self.act = ACTIVATIONS[cfg.activation]
        self.norm = nn.LayerNorm(cfg.text_width, eps=cfg.norm_eps)
        self.decoder = nn.Linear(cfg.text_width, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


def itm_partner(batch_size: int, device: torch.device) -> torch.Tensor:
    """Index of each sample's negative caption: i ^ 1, the other member of its pair.

    Pairs never cross an even-sized split of the batch, so every data-parallel layout forms the same pairs
    (training configs are validated to have even microbatches). In an odd batch (the last one of an evaluation)
    the unpaired last sample borrows its left neighbour's caption.
    """
    index = torch.arange(batch_size, device=device)
    partner = index ^ 1
    return torch.where(partner < batch_size, partner, index - 1)


class MultimodalEncoder(nn.Module):
    """Image tower + text tower (+ fusion) with the heads of the chosen objectives.

    Heads are built only for `objectives` (a subset of contrastive, itm, mlm): an objective with weight 0 costs no
    parameters and no compute. Build on the meta device and call `bigmodel.models.init_weights` to materialise.
    """

    def __init__(self, cfg: ModelConfig, objectives: Collection[str] = OBJECTIVES):
        super().__init__()
        unknown = set(objectives) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {OBJECTIVES}")
        self.cfg = cfg
        self.objectives = tuple(o for o in OBJECTIVES if o in objectives)
        self.vision = VisionTower(cfg)
        self.text = TextTower(cfg)
        # Only ITM and MLM read fused text; without them a fusion stack would hold parameters that never get gradients.
        if cfg.fusion != "none" and {"itm", "mlm"} & set(self.objectives):
            self.fusion = Fusion(cfg)
        if "contrastive" in self.objectives:
            self.contrastive = ContrastiveHead(cfg)
        if "itm" in self.objectives:
            self.itm_head = nn.Linear(cfg.text_width, 2)
        if "mlm" in self.objectives:
            self.mlm_head = MaskedLMHead(cfg)

    def block_stacks(self) -> list[nn.Module]:
        """Every BlockStack of the model, in forward order."""
        stacks = [self.vision.blocks, self.text.blocks]
        if hasattr(self, "fusion"):
            stacks.append(self.fusion.blocks)
        return stacks

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every Transformer block in backward instead of storing its activations."""
        for stack in self.block_stacks():
            stack.activation_checkpointing = enabled

    @staticmethod
    def pool_text(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last real token of each caption (its end-of-text token, as in CLIP): (B, L, D) -> (B, D)."""
        last = attention_mask.sum(dim=1) - 1
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the towers, fusion and heads on a batch (keys as produced by `bigmodel.data`).

        Returns, per objective: contrastive -> image_embeds, text_embeds (B, E) unit-norm and logit_scale (1,);
        itm -> itm_logits (2B, 2) and itm_labels (2B,) for the B true pairs then the B pairs with a neighbour's
        caption; mlm -> mlm_logits (M, V) and mlm_labels (M,) for the M masked positions.
        """
        image = self.vision(batch["pixel_values"])  # (B, 1 + N, Dv)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out: dict[str, torch.Tensor] = {}
        needs_text = "contrastive" in self.objectives or "itm" in self.objectives
        text = self.text(ids, mask) if needs_text else None  # (B, L, Dt)
        if "contrastive" in self.objectives:
            out.update(self.contrastive(image[:, 0], self.pool_text(text, mask)))
        if "itm" in self.objectives:
            out.update(self.image_text_matching(image, text, ids, mask))
        if "mlm" in self.objectives:
            out.update(self.masked_lm(image, batch))
        return out

    def image_text_matching(
        self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Fuse each image with its caption and with its pair neighbour's caption; classify match / no match."""
        partner = itm_partner(ids.shape[0], ids.device)
        both_text = torch.cat([text, text[partner]])  # (2B, L, Dt)
        both_mask = torch.cat([mask, mask[partner]])
        fused = self.fusion(both_text, both_mask, torch.cat([image, image]))  # (2B, L, Dt)
        logits = self.itm_head(fused[:, 0])  # (2B, 2), read at the first (begin-of-text) token
        # A neighbour whose caption is identical is a true match, not a negative.
        same = (ids == ids[partner]).all(dim=1)
        labels = torch.cat([torch.ones_like(same), same]).long()
        return {"itm_logits": logits, "itm_labels": labels}

    def masked_lm(self, image: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode the masked caption, fuse it with its image and predict the masked tokens."""
        mask = batch["attention_mask"]
        text = self.text(batch["mlm_input_ids"], mask)
        fused = self.fusion(text, mask, image)  # (B, L, Dt)
        labels = batch["mlm_labels"]
        selected = labels != -100
        return {"mlm_logits": self.mlm_head(fused[selected]), "mlm_labels": labels[selected]}
