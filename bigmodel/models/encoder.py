"""The multimodal encoder: ViT image tower, Transformer text tower, fusion stack and pretraining heads.

Read top to bottom: towers, fusion, heads, then `MultimodalEncoder`, whose forward returns what the losses in
`bigmodel.losses` need. With fusion `none` the towers, projections and logit scale map one to one onto
transformers' CLIPModel (see `bigmodel.hf.clip`).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from bigmodel.config.layout import EMBEDDING_OBJECTIVES, OBJECTIVES
from bigmodel.config.schema import ModelConfig
from bigmodel.models.fused import FusedBlock
from bigmodel.models.layers import ACTIVATIONS, Block, BlockStack, block_stack

DEFAULT_OBJECTIVES = ("contrastive", "itm", "mlm")
"""The objectives of the default config (train.loss_weights)."""


def blocks(cfg: ModelConfig, width: int, heads: int, mlp_dim: int, layers: int, cross: bool = False) -> BlockStack:
    """A stack of `layers` blocks with the activation, dropout and norm epsilon of `cfg`: plain modules, or the
    CPU-fused kernels where `model.cpu_fused_kernels` asks for them."""
    block = FusedBlock if cfg.cpu_fused_kernels else Block
    return block_stack(width, heads, mlp_dim, layers, cfg.activation, cfg.dropout, cfg.norm_eps, cross, block)


def padding_mask(attention_mask: torch.Tensor, causal: bool | torch.Tensor) -> torch.Tensor:
    """Boolean attention mask, True where query t may attend key s, from a (B, T) 0/1 token mask.

    `causal`: one choice for every row, or a (B,) 0/1 tensor per row (a fusion pass mixes causal caption rows with
    bidirectional ITM rows). Returns (B, 1, 1, T) when nothing is causal, else (B, 1, T, T).
    """
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    if causal is False:
        return keys
    t = attention_mask.shape[1]
    lower = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()  # (T, T)
    if isinstance(causal, torch.Tensor):
        lower = lower | ~causal.bool()[:, None, None, None]  # (B, 1, T, T): bidirectional rows see every key
    return keys & lower  # (B, 1, T, T)


def kept_patches(cfg: ModelConfig) -> int:
    """K, the patches each image keeps in training under FLIP's patch dropout (model.patch_dropout = p): of the
    N = (image_size / patch_size)^2, max(1, int(N (1 - p))), OpenCLIP's PatchDropout rounding."""
    return max(1, int((cfg.image_size // cfg.patch_size) ** 2 * (1 - cfg.patch_dropout)))


def image_tokens(cfg: ModelConfig, training: bool = False) -> int:
    """Tokens per image through the vision blocks and the fusion's image context: the class token and every patch,
    or in training under patch dropout the class token and the K kept patches."""
    if training and cfg.patch_dropout > 0:
        return 1 + kept_patches(cfg)
    return (cfg.image_size // cfg.patch_size) ** 2 + 1


class VisionTower(nn.Module):
    """ViT: patch embedding, class token, learned positions, pre-LN blocks; outputs every token, normalised.

    In training, a batch's `patch_keep` (B, K), the kept patches' indices drawn by the data pipeline (FLIP's patch
    dropout), selects the patch tokens after positions are added; the class token is always kept. Evaluation (or a
    batch without patch_keep) sees every patch.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        width = cfg.vision_width
        self.patch_embedding = nn.Conv2d(cfg.channels, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.position_embedding = nn.Parameter(torch.empty(num_positions, width))
        self.pre_norm = nn.LayerNorm(width, eps=cfg.norm_eps)
        self.blocks = blocks(cfg, width, cfg.vision_heads, cfg.vision_mlp_dim, cfg.vision_layers)
        self.post_norm = nn.LayerNorm(width, eps=cfg.norm_eps)

    def embed(self, pixel_values: torch.Tensor, patch_keep: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> the blocks' input tokens (B, 1 + N, Dv); token 0 is the class token.

        In training with patch_keep (B, K) int64 (indices among the N patches): (B, 1 + K, Dv), the kept patches.
        """
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, Dv)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (B, 1, Dv)
        tokens = torch.cat([cls, patches], dim=1) + self.position_embedding  # (B, 1 + N, Dv)
        if self.training and patch_keep is not None:
            # Positions first, as FLIP does, so a kept patch keeps its place in the image; token 0 is the class token.
            index = torch.cat([patch_keep.new_zeros(patch_keep.shape[0], 1), patch_keep + 1], dim=1)  # (B, 1 + K)
            tokens = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, 1 + K, Dv)
        return self.pre_norm(tokens)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> tokens (B, 1 + N, Dv), normalised; token 0 is the class token."""
        return self.post_norm(self.blocks(self.embed(pixel_values)))


class TextTower(nn.Module):
    """Transformer over token ids with learned positions; causal or bidirectional; outputs every token, normalised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.causal = cfg.text_causal
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.position_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.blocks = blocks(cfg, cfg.text_width, cfg.text_heads, cfg.text_mlp_dim, cfg.text_layers)
        self.final_norm = nn.LayerNorm(cfg.text_width, eps=cfg.norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) -> the blocks' input tokens (B, L, Dt)."""
        return self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]

    def run_blocks(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The blocks this module holds, on tokens x (B, L, Dt) with the 0/1 token mask (B, L)."""
        return self.blocks(x, mask=padding_mask(attention_mask, self.causal))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, L) -> tokens (B, L, Dt), normalised."""
        return self.final_norm(self.run_blocks(self.embed(input_ids), attention_mask))


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
        self.blocks = blocks(
            cfg, width, cfg.text_heads, cfg.text_mlp_dim, cfg.fusion_layers, cross=self.kind == "cross"
        )
        self.norm = nn.LayerNorm(width, eps=cfg.norm_eps)

    def enter(
        self,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        image: torch.Tensor,
        causal: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The fusion blocks' inputs for R rows, each a caption with the image of its sample.

        text (R, L, Dt) and attention_mask (R, L) per row; image (B, N, Dv) with R a multiple of B, row r using image
        r % B; causal (R,) 0/1, the rows whose self-attention is causal (captioning; cross fusion only), or None.
        Returns fused (R, S, Dt), fused_mask (R, S), causal (R,) if given and, for cross fusion, context (B, N, Dt):
        the image tokens projected to the fusion width (cross-attention repeats them over the R rows).
        """
        image = self.image_proj(image)  # (B, N, Dt)
        if self.kind == "cross":
            state = {"fused": text, "fused_mask": attention_mask.to(text.dtype), "context": image}
            return state if causal is None else state | {"causal": causal.to(text.dtype)}
        copies = text.shape[0] // image.shape[0]
        image = image.repeat(copies, 1, 1)  # (R, N, Dt)
        x = torch.cat([text + self.modality_embedding[0], image + self.modality_embedding[1]], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(image.shape[:2])], dim=1)
        return {"fused": x, "fused_mask": mask.to(x.dtype)}

    def run_blocks(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The blocks this module holds, on the fused rows of `state` (see `enter`)."""
        x, mask = state["fused"], padding_mask(state["fused_mask"], causal=state.get("causal", False))
        if self.kind == "cross":
            copies = x.shape[0] // state["context"].shape[0]
            return self.blocks(x, mask=mask, context=state["context"].repeat(copies, 1, 1))
        return self.blocks(x, mask=mask)

    def exit(self, fused: torch.Tensor, text_length: int) -> torch.Tensor:
        """Normalised fused text tokens (R, L, Dt) (merged fusion drops the image positions)."""
        return self.norm(fused[:, :text_length])


class CaptionHead(nn.Module):
    """CoCa's captioning decoder: vocabulary logits of the next token at every fused caption position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.decoder = nn.Linear(cfg.text_width, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)


class ContrastiveHead(nn.Module):
    """Projections into the shared embedding space and the learnable logit scale (inverse temperature); for SigLIP
    (`sigmoid`) also the learnable logit bias, and both start at SigLIP's values."""

    def __init__(self, cfg: ModelConfig, sigmoid: bool = False):
        super().__init__()
        self.visual_projection = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        # Shape (1,), not a scalar: FSDP2 shards parameters along dim 0. CLIPModel stores it as a scalar.
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.logit_scale_max = cfg.logit_scale_max
        self.initial_logit_scale = cfg.siglip_logit_scale_init if sigmoid else cfg.logit_scale_init
        """What bigmodel.models.init fills logit_scale with."""
        if sigmoid:
            self.logit_bias = nn.Parameter(torch.empty(1))
            self.initial_logit_bias = cfg.siglip_logit_bias_init

    def forward(self, image_pooled: torch.Tensor, text_pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        image = nn.functional.normalize(self.visual_projection(image_pooled), dim=-1)  # (B, E)
        text = nn.functional.normalize(self.text_projection(text_pooled), dim=-1)  # (B, E)
        scale = self.logit_scale.clamp(max=self.logit_scale_max).exp()
        # One copy of the scale per row, reached through the batch (a zero-weighted term): zero-bubble pipeline
        # schedules compute weight gradients only along paths that touch the stage's inputs (torch 2.13), and a
        # parameter used on its own would silently get none.
        zero = image[:, :1].mul(0)  # (B, 1)
        out = {"image_embeds": image, "text_embeds": text, "logit_scale": zero + scale}
        if hasattr(self, "logit_bias"):
            out["logit_bias"] = zero + self.logit_bias
        return out


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


def has_next_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True at the positions captioning scores: those whose next token is real (not padding)."""
    real = attention_mask.bool()
    return torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], dim=1)


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Captioning targets (B, L): input_ids[t + 1] where `has_next_token`, else -100 (the last real token, padding)."""
    return torch.where(has_next_token(attention_mask), input_ids.roll(-1, dims=1), -100)


class MultimodalEncoder(nn.Module):
    """Image tower + text tower (+ fusion) with the heads of the chosen objectives.

    Heads are built only for `objectives` (a subset of OBJECTIVES): an objective with weight 0 costs no
    parameters and no compute. Contrastive and SigLIP share one head (projections and logit scale; SigLIP adds
    its bias), so at most one of them is active. Build on the meta device and call `bigmodel.models.init_weights`
    to materialise.
    """

    def __init__(self, cfg: ModelConfig, objectives: Collection[str] = DEFAULT_OBJECTIVES):
        super().__init__()
        unknown = set(objectives) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {OBJECTIVES}")
        self.cfg = cfg
        self.objectives = tuple(o for o in OBJECTIVES if o in objectives)
        self.vision = VisionTower(cfg)
        self.text = TextTower(cfg)
        # Only ITM, MLM and captioning read fused text; without them a fusion stack would hold parameters that never
        # get gradients.
        if cfg.fusion != "none" and {"itm", "mlm", "caption"} & set(self.objectives):
            self.fusion = Fusion(cfg)
        if self.embeds:
            self.contrastive = ContrastiveHead(cfg, sigmoid="siglip" in self.objectives)
        if "itm" in self.objectives:
            self.itm_head = nn.Linear(cfg.text_width, 2)
        if "mlm" in self.objectives:
            self.mlm_head = MaskedLMHead(cfg)
        if "caption" in self.objectives:
            self.caption_head = CaptionHead(cfg)
        self.every_position = False
        """Predict every caption position (B, L, V) for MLM and captioning instead of the scored ones (M, V): a shape
        that does not depend on the data, which pipeline stages need; the loss then selects the scored positions."""

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
        # The clamp changes nothing for real masks; pipeline schedules also run stages on made-up activations to
        # infer shapes, and their masks must not index out of bounds.
        last = (attention_mask.sum(dim=1).long() - 1).clamp(0, tokens.shape[1] - 1)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]

    # The forward is a chain of parts that pass a dict of tensors (the "state") along; a pipeline stage runs a
    # contiguous piece of the chain (bigmodel.parallel.pipeline):
    #   embed -> vision blocks -> text blocks -> join -> fusion blocks -> heads
    # Captions go through the text tower together (the plain caption for contrastive / ITM / captioning, the masked
    # one for MLM), and every fused row (ITM true pairs, ITM negatives, MLM, captioning) goes through the fusion
    # blocks together; captioning's rows attend causally, the others bidirectionally.

    @property
    def embeds(self) -> bool:
        """Whether an objective scores pooled embeddings (contrastive or SigLIP)."""
        return bool(set(EMBEDDING_OBJECTIVES) & set(self.objectives))

    @property
    def encodes_plain_text(self) -> bool:
        return self.embeds or bool({"itm", "caption"} & set(self.objectives))

    @property
    def fuses(self) -> bool:
        return hasattr(self, "fusion")

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Embeddings of the image and of every caption copy, plus the masks the later parts need.

        State: image (B, 1 + N, Dv) (1 + K in training under patch dropout), text (T*B, L, Dt) for T caption
        copies, mask (B, L); same (B,) when ITM is on (1.0 where the pair neighbour's caption is identical);
        selected (B, L) when MLM is on. Masks are float so that every state entry can travel between pipeline
        stages.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        captions = [ids] if self.encodes_plain_text else []
        if "mlm" in self.objectives:
            captions.append(batch["mlm_input_ids"])
        state = {
            "image": self.vision.embed(batch["pixel_values"], batch.get("patch_keep")),
            "text": self.text.embed(torch.cat(captions)),
            "mask": mask.float(),
        }
        if "itm" in self.objectives:
            partner = itm_partner(ids.shape[0], ids.device)
            state["same"] = (ids == ids[partner]).all(dim=1).float()
        if "mlm" in self.objectives:
            state["selected"] = (batch["mlm_labels"] != -100).float()
        return state

    def run_vision_blocks(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The image tower blocks this module holds."""
        return state | {"image": self.vision.blocks(state["image"])}

    def run_text_blocks(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The text tower blocks this module holds, on every caption copy."""
        copies = state["text"].shape[0] // state["mask"].shape[0]
        return state | {"text": self.text.run_blocks(state["text"], state["mask"].repeat(copies, 1))}

    def join(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """End both towers: contrastive embeddings, and the fusion inputs (rows: ITM true pairs, ITM pairs with the
        neighbour's caption, MLM, captioning), carrying the masks the heads need."""
        image = self.vision.post_norm(state["image"])  # (B, 1 + N, Dv)
        text = self.text.final_norm(state["text"])  # (T*B, L, Dt)
        mask = state["mask"]
        b = mask.shape[0]
        out = {k: state[k] for k in ("mask", "same", "selected") if k in state}
        if self.embeds:
            out.update(self.contrastive(image[:, 0], self.pool_text(text[:b], mask)))
        if self.fuses:
            rows, row_masks = [], []
            if "itm" in self.objectives:
                partner = itm_partner(b, mask.device)
                rows += [text[:b], text[:b][partner]]
                row_masks += [mask, mask[partner]]
            if "mlm" in self.objectives:
                rows.append(text[-b:])
                row_masks.append(mask)
            causal = None
            if "caption" in self.objectives:  # the plain caption again, decoded causally (last, as MLM never joins)
                rows.append(text[:b])
                row_masks.append(mask)
                causal = torch.cat([mask.new_zeros(len(rows) * b - b), mask.new_ones(b)])  # (R,)
            out.update(self.fusion.enter(torch.cat(rows), torch.cat(row_masks), image, causal))
        return out

    def run_fusion_blocks(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fusion blocks this module holds."""
        return state | {"fused": self.fusion.run_blocks(state)}

    def heads(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The objectives' outputs (see forward) from the joined or fused state."""
        out = {k: state[k] for k in ("image_embeds", "text_embeds", "logit_scale", "logit_bias") if k in state}
        if not self.fuses:
            return out
        b, length = state["mask"].shape
        fused = self.fusion.exit(state["fused"], length)  # (R, L, Dt)
        if "itm" in self.objectives:
            out["itm_logits"] = self.itm_head(fused[: 2 * b, 0])  # (2B, 2), read at the begin-of-text token
            # A neighbour whose caption is identical is a true match, not a negative.
            same = state["same"] > 0.5  # a 0/1 float mask (it may travel between pipeline stages)
            out["itm_labels"] = torch.cat([torch.ones_like(same), same]).long()
        if "mlm" in self.objectives:
            if self.every_position:
                out["mlm_logits"] = self.mlm_head(fused[-b:])  # (B, L, V)
            else:
                out["mlm_logits"] = self.mlm_head(fused[-b:][state["selected"].bool()])  # (M, V)
        if "caption" in self.objectives:
            if self.every_position:
                out["caption_logits"] = self.caption_head(fused[-b:])  # (B, L, V)
            else:
                out["caption_logits"] = self.caption_head(fused[-b:][has_next_token(state["mask"])])  # (M, V)
        return out

    def decode(self, image: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Captioning logits (B, T, V) at every position of the prefixes input_ids (B, T), all tokens real, for the
        image tower's output tokens image (B, 1 + N, Dv). Position t reads tokens 0..t only, as in training."""
        mask = torch.ones_like(input_ids)
        text = self.text(input_ids, mask)  # (B, T, Dt), causal
        causal = mask.new_ones(input_ids.shape[0])
        fused = self.fusion.run_blocks(self.fusion.enter(text, mask, image, causal))
        return self.caption_head(self.fusion.exit(fused, input_ids.shape[1]))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the towers, fusion and heads on a batch (keys as produced by `bigmodel.data`).

        Returns, per objective: contrastive -> image_embeds, text_embeds (B, E) unit-norm and logit_scale (B, 1)
        (one value, repeated per row); siglip -> the same and logit_bias (B, 1);
        itm -> itm_logits (2B, 2) and itm_labels (2B,) for the B true pairs then the B pairs with a neighbour's
        caption; mlm -> mlm_logits (M, V) and mlm_labels (M,) for the M masked positions; caption ->
        caption_logits (M, V) and caption_labels (M,) for the M positions that have a next token (`next_token_labels`).
        """
        state = self.run_text_blocks(self.run_vision_blocks(self.embed(batch)))
        state = self.join(state)
        if self.fuses:
            state = self.run_fusion_blocks(state)
        out = self.heads(state)
        if "mlm" in self.objectives:
            labels = batch["mlm_labels"]
            out["mlm_labels"] = labels[labels != -100]
        if "caption" in self.objectives:
            labels = next_token_labels(batch["input_ids"], batch["attention_mask"])
            out["caption_labels"] = labels[labels != -100]
        return out
