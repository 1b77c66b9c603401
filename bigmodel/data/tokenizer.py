"""Caption tokenizers built on the `tokenizers` library, with special tokens at fixed ids.

Every tokenizer the project uses reserves [PAD]=0, [UNK]=1, [MASK]=2, [BOS]=3, [EOS]=4, so the model, the MLM
masking and checkpoints never depend on which tokenizer produced a batch. EOS is deliberately not 2: HF
transformers' CLIP text model pools at argmax(input_ids) when eos_token_id == 2, which would pick the wrong token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from bigmodel.data.shapes import shapes_vocabulary

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[MASK]", "[BOS]", "[EOS]")
"""The special tokens, in id order: token SPECIAL_TOKENS[i] has id i in every tokenizer."""
BUILTIN_TOKENIZER_PATH = Path(__file__).parent / "assets" / "shapes_tokenizer.json"
_FIX = "retrain it with `bigmodel data train-tokenizer` (which reserves [PAD]=0 [UNK]=1 [MASK]=2 [BOS]=3 [EOS]=4)"
_BPE_WORD_END = "</w>"


class CaptionTokenizer:
    """Turns captions into fixed-length id sequences: [BOS] tokens [EOS] [PAD]...

    Raises ValueError if `tokenizer` lacks one of SPECIAL_TOKENS at its fixed id; `name` (e.g. the file it came
    from) is what that message calls it.
    """

    def __init__(self, tokenizer: Tokenizer, name: str = "tokenizer") -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            actual_id = tokenizer.token_to_id(token)
            if actual_id != expected_id:
                found = "is missing" if actual_id is None else f"has id {actual_id}"
                raise ValueError(f"{name}: special token {token} {found}, expected id {expected_id}; {_FIX}")
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; ids are 0..vocab_size-1."""
        return self._tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def mask_id(self) -> int:
        return 2

    @property
    def bos_id(self) -> int:
        return 3

    @property
    def eos_id(self) -> int:
        return 4

    @property
    def num_special(self) -> int:
        """Ids below this are special tokens; ids from it up to vocab_size are ordinary tokens."""
        return len(SPECIAL_TOKENS)

    def encode(self, caption: str, context_length: int) -> tuple[list[int], list[int]]:
        """Token ids and attention mask of `caption`, both `context_length` long.

        The ids are [BOS] tokens [EOS] followed by [PAD]; tokens are truncated so that [EOS] is always present.
        The mask is 1 on [BOS], the tokens and [EOS], 0 on padding.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (room for [BOS] and [EOS]), got {context_length}")
        tokens = self._tokenizer.encode(caption, add_special_tokens=False).ids[: context_length - 2]
        ids = [self.bos_id, *tokens, self.eos_id]
        padding = context_length - len(ids)
        return ids + [self.pad_id] * padding, [1] * len(ids) + [0] * padding

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens dropped."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        """The tokenizer.json text that `load_tokenizer` reads back."""
        return self._tokenizer.to_str(pretty=True)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer.json to `path`."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")


def train_tokenizer(
    captions: Iterable[str], kind: Literal["wordlevel", "bpe"] = "wordlevel", vocab_size: int = 128
) -> CaptionTokenizer:
    """Train a lowercasing tokenizer on `captions`, with at most `vocab_size` ids (special tokens included).

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


def load_tokenizer(spec: str) -> CaptionTokenizer:
    """Load the tokenizer named by DataConfig.tokenizer: "builtin" or a path to a tokenizer.json.

    Raises ValueError (one line naming the file and the fix) if the file is missing, unreadable or lacks the
    special tokens at their fixed ids.
    """
    path = BUILTIN_TOKENIZER_PATH if spec == "builtin" else Path(spec)
    if not path.is_file():
        raise ValueError(
            f"tokenizer file {path} not found (data.tokenizer); "
            "use 'builtin' or a tokenizer.json written by `bigmodel data train-tokenizer`"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    # The tokenizers library reports every parse failure as a bare Exception.
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({reason}); {_FIX}") from None
    return CaptionTokenizer(tokenizer, name=str(path))
