"""A run's tokenizer and image preprocessing as transformers' CLIPProcessor parts (tokenizer files and
preprocessor_config.json), so that `CLIPProcessor.from_pretrained(folder)` prepares inputs as bigmodel does.

transformers is the optional `hf` extra, imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, processors

from bigmodel.config.schema import Config
from bigmodel.data.tokenizer import CaptionTokenizer

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor

_HALF = [0.5, 0.5, 0.5]  # data.transform shapes scales [0, 1] to [-1, 1]: (x - 0.5) / 0.5
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, which both data.transform choices resize with
_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # a tokenizer.json as it is, in transformers 4 and 5


def _with_caption_template(tokenizer: CaptionTokenizer) -> Tokenizer:
    """A copy of the tokenizers object whose post-processor wraps a caption as CaptionTokenizer.encode does
    (BOS tokens EOS); the tokenizer's own post-processor is kept when it already does."""
    backend = Tokenizer.from_str(tokenizer.to_json())
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    probe = backend.encode("a photo", add_special_tokens=False).ids
    if backend.encode("a photo").ids == [*head, *probe, tokenizer.eos_id]:
        return backend
    tokens = tokenizer.special_tokens
    specials = {tokens["eos"]: tokenizer.eos_id}
    single = f"$A {tokens['eos']}"
    if tokenizer.bos_id is not None:
        specials[tokens["bos"]] = tokenizer.bos_id
        single = f"{tokens['bos']} {single}"
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=list(specials.items()))
    return backend


def save_tokenizer(tokenizer: CaptionTokenizer, folder: str | Path, context_length: int) -> None:
    """Write `tokenizer` with transformers' save_pretrained (tokenizer.json, tokenizer_config.json): its special
    tokens named, PAD as bigmodel pads (EOS when it has no PAD), model_max_length = context_length, so that
    AutoTokenizer / CLIPProcessor load it and `tokenizer(captions, padding="max_length", truncation=True)` gives
    CaptionTokenizer.encode's ids."""
    from transformers import PreTrainedTokenizerFast

    named = {f"{role}_token": text for role, text in tokenizer.special_tokens.items()}
    named.setdefault("pad_token", tokenizer.special_tokens["eos"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_with_caption_template(tokenizer), model_max_length=context_length, **named
    )
    fast.save_pretrained(str(folder))
    # transformers 5 records its class as TokenizersBackend, a name transformers 4 lacks; both know this alias.
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(
        json.dumps({**config, "tokenizer_class": _TOKENIZER_CLASS}, indent=2) + "\n", encoding="utf-8"
    )


def image_processor(cfg: Config) -> CLIPImageProcessor | None:
    """The CLIPImageProcessor that prepares evaluation images as the run's data.transform does.

    clip: resize of the shortest side to model.image_size, centre crop, data.image_mean / image_std: the same
    steps, but transformers floors the crop margin where bigmodel and OpenCLIP round it (the crop can sit one
    pixel apart) and its default resize rounds up to one uint8 level differently. shapes: resize to
    model.image_size squared without a crop, mean = std = 0.5, no augmentation: equal on images already
    model.image_size square (the embedded data's); other sizes go through transformers' own resize, which rounds
    differently. None for model.channels 1: CLIPImageProcessor makes RGB images only.
    """
    from transformers import CLIPImageProcessor

    side = cfg.model.image_size
    if cfg.model.channels != 3:
        return None
    if cfg.data.transform == "clip":
        return CLIPImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            do_center_crop=True,
            resample=_BICUBIC,
            image_mean=list(cfg.data.image_mean),
            image_std=list(cfg.data.image_std),
        )
    return CLIPImageProcessor(
        size={"height": side, "width": side},
        do_center_crop=False,
        resample=_BICUBIC,
        image_mean=_HALF,
        image_std=_HALF,
    )
