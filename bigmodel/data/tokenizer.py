"""Caption tokenizers: any `tokenizers` tokenizer.json or transformers tokenizer folder, with its own special tokens.

A tokenizer's begin-of-text (BOS), end-of-text (EOS), padding (PAD), mask (MASK) and unknown (UNK) tokens are read
from the tokenizer itself, as transformers does: a folder's tokenizer_config.json and special_tokens_map.json name
them; otherwise (a bare tokenizer.json, or a role those files leave out) the post-processor's template gives BOS and
EOS, and the well-known names in KNOWN_NAMES give the rest. PAD falls back to EOS (transformers' CLIPTokenizer does
the same). Tokenizers trained here (`train_tokenizer`, the builtin one) reserve [PAD]=0 [UNK]=1 [MASK]=2 [BOS]=3
[EOS]=4; EOS is deliberately not 2, since transformers' CLIP text model pools at argmax(input_ids) when
eos_token_id == 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from bigmodel.data.shapes import shapes_vocabulary

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[MASK]", "[BOS]", "[EOS]")
"""The special tokens of tokenizers trained here, in id order: SPECIAL_TOKENS[i] has id i."""
ROLES: tuple[str, ...] = ("bos", "eos", "pad", "mask", "unk")
"""The special-token roles, as transformers names them without the `_token` suffix."""
KNOWN_NAMES: dict[str, tuple[str, ...]] = {
    "bos": ("[BOS]", "<|startoftext|>", "<start_of_text>", "<s>", "<bos>"),
    "eos": ("[EOS]", "<|endoftext|>", "<end_of_text>", "</s>", "<eos>"),
    "pad": ("[PAD]", "<pad>"),
    "mask": ("[MASK]", "<mask>"),
    "unk": ("[UNK]", "<unk>"),
}
"""Per role, the token texts taken to play it (first present wins) when nothing else names the role."""
BUILTIN_TOKENIZER_PATH = Path(__file__).parent / "assets" / "shapes_tokenizer.json"
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # later files override earlier (transformers)
_FIX = "use 'builtin', a tokenizer.json, a transformers tokenizer folder or one from `bigmodel data train-tokenizer`"
_BPE_WORD_END = "</w>"


class CaptionTokenizer:
    """Turns captions into fixed-length id sequences: BOS tokens EOS PAD... (no BOS where the tokenizer has none).

    `named` maps roles (ROLES) to token texts, as a transformers folder's config files do; roles it leaves out are
    inferred from `tokenizer` (module docstring). ValueError (one line, called `name`) if the tokenizer has no EOS
    or a named token is not in its vocabulary.
    """

    def __init__(self, tokenizer: Tokenizer, named: Mapping[str, str] | None = None, name: str = "tokenizer") -> None:
        tokenizer.no_padding()  # a saved tokenizer.json may carry padding or truncation settings; encode owns both
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self._tokens = {**_inferred_tokens(tokenizer), **(named or {})}
        self._ids: dict[str, int] = {}
        for role, token in self._tokens.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{name}: its {role}_token {token!r} is not in the vocabulary; {_FIX}")
            self._ids[role] = token_id
        if "eos" not in self._ids:
            raise ValueError(
                f"{name}: the tokenizer has no end-of-text (EOS) token; name it as eos_token in tokenizer_config.json, "
                f"or add one: tokenizer.add_special_tokens(['[EOS]']) (tokenizers library); or {_FIX}"
            )
        added = tokenizer.get_added_tokens_decoder()
        special = {token_id for token_id, token in added.items() if token.special} | set(self._ids.values())
        self._special_ids = tuple(sorted(special))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included; ids are 0..vocab_size-1."""
        return self._tokenizer.get_vocab_size()

    @property
    def bos_id(self) -> int | None:
        """The begin-of-text id, or None for a tokenizer without one (captions then start with their first token)."""
        return self._ids.get("bos")

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def pad_id(self) -> int:
        """The padding id; the EOS id for a tokenizer without a padding token (as transformers' CLIPTokenizer)."""
        return self._ids.get("pad", self.eos_id)

    @property
    def mask_id(self) -> int | None:
        """The [MASK] id for masked language modelling, or None for a tokenizer without one."""
        return self._ids.get("mask")

    @property
    def unk_id(self) -> int | None:
        return self._ids.get("unk")

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Every special id, sorted: the roles' ids and the tokenizer's added special tokens. MLM never selects or
        draws these."""
        return self._special_ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """Role (ROLES) -> token text for the roles this tokenizer has; pad is absent when it falls back to EOS."""
        return dict(self._tokens)

    def encode(self, caption: str, context_length: int) -> tuple[list[int], list[int]]:
        """Token ids and attention mask of `caption`, both `context_length` long.

        The ids are BOS tokens EOS followed by PAD; tokens are truncated so that EOS is always present (as
        transformers' CLIPTokenizer with truncation and OpenCLIP's tokenize do). The mask is 1 on BOS, the
        tokens and EOS, 0 on padding.
        """
        head = [] if self.bos_id is None else [self.bos_id]
        if context_length < len(head) + 1:
            raise ValueError(f"context_length must leave room for BOS and EOS, got {context_length}")
        room = context_length - len(head) - 1
        tokens = self._tokenizer.encode(caption, add_special_tokens=False).ids[:room]
        ids = [*head, *tokens, self.eos_id]
        padding = context_length - len(ids)
        return ids + [self.pad_id] * padding, [1] * len(ids) + [0] * padding

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens dropped."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        """The tokenizer.json text (the `tokenizers` serialisation, without special-token roles)."""
        return self._tokenizer.to_str(pretty=True)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer.json to `path`."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")


def _processor_tokens(processor: dict[str, Any] | None) -> dict[str, str]:
    """BOS and EOS as a tokenizer.json post-processor adds them around a single sequence (empty if it adds none)."""
    if not processor:
        return {}
    kind = processor["type"]
    if kind == "Sequence":
        found = [_processor_tokens(p) for p in processor["processors"]]
        return next((tokens for tokens in found if tokens), {})
    if kind in ("RobertaProcessing", "BertProcessing"):
        return {"bos": processor["cls"][0], "eos": processor["sep"][0]}
    if kind != "TemplateProcessing":
        return {}
    pieces = processor["single"]
    sequence = next((i for i, piece in enumerate(pieces) if "Sequence" in piece), None)
    if sequence is None:
        return {}
    texts = {key: value["tokens"] for key, value in processor["special_tokens"].items()}
    before = [texts[p["SpecialToken"]["id"]] for p in pieces[:sequence] if "SpecialToken" in p]
    after = [texts[p["SpecialToken"]["id"]] for p in pieces[sequence + 1 :] if "SpecialToken" in p]
    tokens = {}
    if before and len(before[-1]) == 1:
        tokens["bos"] = before[-1][0]
    if after and len(after[0]) == 1:
        tokens["eos"] = after[0][0]
    return tokens


def _inferred_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """Role -> token text from the tokenizer alone: its post-processor, then KNOWN_NAMES, then the model's UNK."""
    serialized = json.loads(tokenizer.to_str())
    tokens = _processor_tokens(serialized.get("post_processor"))
    for role in ROLES:
        if role not in tokens:
            present = [name for name in KNOWN_NAMES[role] if tokenizer.token_to_id(name) is not None]
            if present:
                tokens[role] = present[0]
    unk = serialized["model"].get("unk_token")
    if "unk" not in tokens and unk is not None:
        tokens["unk"] = unk
    return tokens


def _token_text(value: str | dict[str, Any]) -> str:
    """A special token as transformers' config files store it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else value


def _configured_tokens(folder: Path) -> dict[str, str]:
    """Role -> token text as `folder`'s tokenizer_config.json and special_tokens_map.json name them (the latter
    wins, as in transformers); roles they leave out or set to null are absent."""
    tokens: dict[str, str] = {}
    for file_name in _CONFIG_FILES:
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}); repair or remove it") from None
        tokens.update({r: _token_text(config[f"{r}_token"]) for r in ROLES if config.get(f"{r}_token")})
    return tokens


def _read_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    # The tokenizers library reports every parse failure as a bare Exception.
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({reason}); {_FIX}") from None


def _converted_vocabulary(folder: Path) -> tuple[Tokenizer, dict[str, str]]:
    """The tokenizer of a folder holding vocab.json + merges.txt but no tokenizer.json, converted by transformers
    (its tokenizer_config.json's class, CLIPTokenizer without one), and the special tokens transformers gives it."""
    try:
        from transformers import AutoTokenizer, CLIPTokenizer
    except ImportError:
        raise ValueError(
            f"{folder} holds vocab.json + merges.txt but no tokenizer.json; reading them needs transformers (pip "
            "install bigmodel[hf]), or write tokenizer.json once with transformers' save_pretrained"
        ) from None
    config = folder / "tokenizer_config.json"
    has_class = config.is_file() and "tokenizer_class" in json.loads(config.read_text(encoding="utf-8"))
    converted = (AutoTokenizer if has_class else CLIPTokenizer).from_pretrained(str(folder))
    given = converted.special_tokens_map  # {"bos_token": text, ...} for the tokens it has
    named = {role: given[f"{role}_token"] for role in ROLES if f"{role}_token" in given}
    return Tokenizer.from_str(converted.backend_tokenizer.to_str()), named


def holds_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a transformers tokenizer: tokenizer.json, or vocab.json + merges.txt."""
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))


def _load_folder(folder: Path) -> CaptionTokenizer:
    if (folder / "tokenizer.json").is_file():
        tokenizer, named = _read_tokenizer_json(folder / "tokenizer.json"), {}
    elif holds_tokenizer(folder):
        tokenizer, named = _converted_vocabulary(folder)
    else:
        raise ValueError(f"{folder} holds no tokenizer.json (nor vocab.json + merges.txt) for data.tokenizer; {_FIX}")
    return CaptionTokenizer(tokenizer, {**named, **_configured_tokens(folder)}, name=str(folder))


def load_tokenizer(spec: str) -> CaptionTokenizer:
    """The tokenizer named by DataConfig.tokenizer: "builtin", a tokenizer.json file, or a transformers tokenizer
    folder (tokenizer.json, or vocab.json + merges.txt, with tokenizer_config.json / special_tokens_map.json).

    Raises ValueError (one line naming the file and the fix) if it is missing, unreadable or has no EOS token.
    """
    path = BUILTIN_TOKENIZER_PATH if spec == "builtin" else Path(spec)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {path} not found (data.tokenizer); {_FIX}")
    return CaptionTokenizer(_read_tokenizer_json(path), name=str(path))


def train_tokenizer(
    captions: Iterable[str], kind: Literal["wordlevel", "bpe"] = "wordlevel", vocab_size: int = 128
) -> CaptionTokenizer:
    """Train a lowercasing tokenizer on `captions`, with at most `vocab_size` ids (SPECIAL_TOKENS included, at
    ids 0-4).

    wordlevel: one id per word (split on whitespace and punctuation); words beyond the vocabulary become [UNK].
    bpe: byte-pair merges within words, for open vocabularies. Training is deterministic: ties in frequency are
    broken alphabetically.
    """
    if kind == "wordlevel":
        tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=0, special_tokens=list(SPECIAL_TOKENS), show_progress=False
        )
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]", end_of_word_suffix=_BPE_WORD_END))
        tokenizer.decoder = decoders.BPEDecoder(suffix=_BPE_WORD_END)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            end_of_word_suffix=_BPE_WORD_END,
            show_progress=False,
        )
    else:
        raise ValueError(f"tokenizer kind must be 'wordlevel' or 'bpe', got {kind!r}")
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(captions, trainer=trainer)
    return CaptionTokenizer(tokenizer)


def train_builtin_tokenizer() -> CaptionTokenizer:
    """The builtin tokenizer: word level over every word a shapes caption can contain.

    The shipped BUILTIN_TOKENIZER_PATH is this tokenizer's `save`; regenerate it after changing the shapes
    vocabulary with `train_builtin_tokenizer().save(BUILTIN_TOKENIZER_PATH)`.
    """
    return train_tokenizer(shapes_vocabulary(), kind="wordlevel")
