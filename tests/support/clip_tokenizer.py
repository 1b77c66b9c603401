"""OpenAI CLIP's real tokenizer without a download: vocab.json and merges.txt made from the BPE merges that
open_clip ships (bpe_simple_vocab_16e6.txt.gz), laid out as in OpenAI's transformers repositories."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

VOCAB_SIZE = 49408
BOS, EOS = 49406, 49407  # <|startoftext|>, <|endoftext|>
_MERGES = 49152 - 256 - 2  # the merges CLIP uses (open_clip's SimpleTokenizer and transformers' CLIPTokenizer)


def _byte_symbols() -> list[str]:
    """The 256 unicode stand-ins of bytes, in the order open_clip's bytes_to_unicode gives them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + n) for n in range(len(others))]


def write_clip_vocabulary(folder: Path) -> Path:
    """Write vocab.json and merges.txt of OpenAI CLIP's tokenizer into `folder` (built as open_clip's
    SimpleTokenizer builds its vocabulary: bytes, bytes + </w>, merges, then the two special tokens)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip_torch (a test extra) is not installed")
    merges_file = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(merges_file.read_bytes()).decode("utf-8").split("\n")[1 : _MERGES + 1]
    symbols = _byte_symbols()
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory) -> Path:
    """A transformers tokenizer folder of OpenAI CLIP's tokenizer: vocab.json and merges.txt, plus the
    tokenizer.json and tokenizer_config.json that CLIPTokenizer's save_pretrained writes. Read-only for tests."""
    transformers = pytest.importorskip("transformers")
    folder = write_clip_vocabulary(tmp_path_factory.mktemp("clip-tokenizer"))
    transformers.CLIPTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    return folder
