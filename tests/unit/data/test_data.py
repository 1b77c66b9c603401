"""The data package: shapes dataset, tokenizer, shards, deterministic loaders and the `bigmodel data` command.

Everything runs on real files in tmp_path with datasets of a few dozen samples, so the file takes seconds.
"""

from __future__ import annotations

import argparse
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from bigmodel.cli import data as data_cli
from bigmodel.config.schema import Config, DataConfig, ModelConfig, TrainConfig
from bigmodel.data import (
    IGNORE_INDEX,
    BadSample,
    EvalLoader,
    ImageTextDataset,
    IndexedShards,
    ShapesSource,
    build_eval_loader,
    build_train_loader,
    load_tokenizer,
    mask_tokens,
    pack_pairs,
    render_shapes,
    train_tokenizer,
    write_shapes_shards,
)
from bigmodel.data.loader import epoch_permutation
from bigmodel.data.shapes import COLOURS, REGIONS, SHAPES, shapes_vocabulary
from bigmodel.data.shards import write_shards
from bigmodel.data.tokenizer import BUILTIN_TOKENIZER_PATH, train_builtin_tokenizer

BATCH_KEYS = {"pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels", "index", "sample_id"}


def make_config(**data: object) -> Config:
    """A small config: 40 training samples, so a few steps of global batch 16 cross epoch boundaries."""
    fields = {"train_size": 40, "eval_size": 12, **data}
    return Config(data=DataConfig(**fields), train=TrainConfig(global_batch_size=16, seed=7))


def assert_batches_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    # Exact equality: every sample is a pure function of (seed, position), so no tolerance is justified.
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- shapes


def test_shapes_are_a_pure_function_of_split_and_index() -> None:
    image, caption = render_shapes("train", 3, 32, 2)
    again, caption_again = render_shapes("train", 3, 32, 2)
    assert np.array_equal(image, again) and caption == caption_again
    train = [render_shapes("train", i, 32, 2)[1] for i in range(50)]
    held_out = [render_shapes("eval", i, 32, 2)[1] for i in range(50)]
    assert train != held_out


@pytest.mark.parametrize("image_size", [16, 32, 48])
def test_shapes_render_at_any_size_with_vocabulary_words(image_size: int) -> None:
    vocabulary = set(shapes_vocabulary())
    for index in range(20):
        image, caption = render_shapes("train", index, image_size, 3)
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
        assert set(caption.split()) <= vocabulary
        assert 1 <= caption.count(" and a ") + 1 <= 3


def test_shapes_captions_match_pixels() -> None:
    """Every named shape shows its colour in its named cell, larger when large; unnamed cells are background."""
    size = 63  # cells of 21 pixels: room for fully covered pixels even in small crosses
    cell = size // 3
    covered_by_kind: dict[tuple[str, str], list[int]] = {}
    for index in range(60):
        image, caption = render_shapes("eval", index, size, 3)
        named = {}
        for phrase in caption.split(" and "):
            _, shape_size, colour, shape, *region = phrase.split()
            named[REGIONS.index(" ".join(region))] = (shape_size, colour, shape)
        empty = [c for c in range(9) if c not in named]
        background = image[(empty[0] // 3) * cell + cell // 2, (empty[0] % 3) * cell + cell // 2]
        for region in range(9):
            row, column = divmod(region, 3)
            pixels = image[row * cell : (row + 1) * cell, column * cell : (column + 1) * cell]
            if region in named:
                shape_size, colour, shape = named[region]
                covered = int(np.all(pixels == COLOURS[colour], axis=-1).sum())
                assert covered > 0, (index, caption, region)
                covered_by_kind.setdefault((shape, shape_size), []).append(covered)
            else:
                # The outermost pixels may catch a neighbour's anti-aliased edge; the inside must be untouched.
                assert np.all(pixels[1:-1, 1:-1] == background), (index, caption, region)
    for shape in SHAPES:
        # Large radius is 0.42 of the cell, small 0.26: every large shape covers more pixels than any small one.
        assert min(covered_by_kind[shape, "large"]) > max(covered_by_kind[shape, "small"]), shape


# ------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_special_tokens_and_truncation() -> None:
    tokenizer = load_tokenizer("builtin")
    special_ids = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id)
    assert special_ids == (0, 1, 2, 3, 4)
    assert tokenizer.vocab_size == 5 + len(shapes_vocabulary()) <= ModelConfig().vocab_size
    ids, mask = tokenizer.encode("A Large red CIRCLE, zebra", 10)
    words = [tokenizer.decode([i]) for i in ids[1:5]]
    assert words == ["a", "large", "red", "circle"]
    assert ids[5] == tokenizer.unk_id and ids[6] == tokenizer.unk_id  # "," and "zebra"
    assert ids[0] == 3 and ids[7] == 4 and ids[8:] == [0, 0]
    assert mask == [1] * 8 + [0] * 2
    truncated, truncated_mask = tokenizer.encode("a large red circle at the top left", 5)
    assert truncated == [3, *ids[1:4], 4] and truncated_mask == [1] * 5


def test_shipped_tokenizer_equals_regenerated() -> None:
    shipped = json.loads(BUILTIN_TOKENIZER_PATH.read_text(encoding="utf-8"))
    assert shipped == json.loads(train_builtin_tokenizer().to_json()), (
        "regenerate with train_builtin_tokenizer().save(BUILTIN_TOKENIZER_PATH)"
    )


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_trained_tokenizer_round_trips_through_a_file(kind: str, tmp_path) -> None:
    captions = [render_shapes("train", i, 16, 2)[1] for i in range(100)]
    tokenizer = train_tokenizer(captions, kind, vocab_size=60)
    assert tokenizer.vocab_size <= 60
    tokenizer.save(tmp_path / "tok.json")
    loaded = load_tokenizer(str(tmp_path / "tok.json"))
    assert loaded.encode(captions[0], 32) == tokenizer.encode(captions[0], 32)
    assert loaded.decode(loaded.encode(captions[0], 32)[0]) == captions[0]


def test_bad_tokenizer_files_give_one_line_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"nope\.json not found") as missing:
        load_tokenizer(str(tmp_path / "nope.json"))
    without_specials = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    without_specials.pre_tokenizer = pre_tokenizers.Whitespace()
    without_specials.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match=r"plain\.json: .*no end-of-text \(EOS\) token") as no_specials:
        load_tokenizer(str(tmp_path / "plain.json"))
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"garbage\.json") as garbage:
        load_tokenizer(str(tmp_path / "garbage.json"))
    for error in (missing, no_specials, garbage):
        assert "\n" not in str(error.value)


def test_vocab_larger_than_model_is_rejected(tmp_path) -> None:
    big = train_tokenizer([f"word{i}" for i in range(200)], "wordlevel", vocab_size=1000)
    big.save(tmp_path / "big.json")
    cfg = make_config(tokenizer=str(tmp_path / "big.json"))
    with pytest.raises(ValueError, match=r"model\.vocab_size .*at least 205"):
        build_train_loader(cfg, 0, 1)


# ------------------------------------------------------------------------------------------------------- MLM


def test_mlm_masking_statistics() -> None:
    tokenizer = load_tokenizer("builtin")
    length, words, captions = 14, 10, 4000
    ids = np.array([3, *range(5, 5 + words), 4, 0, 0])
    rng = np.random.default_rng(0)
    results = [mask_tokens(ids, tokenizer, 0.15, rng) for _ in range(captions)]
    masked = np.stack([m for m, _ in results])
    labels = np.stack([label for _, label in results])
    selected = labels != IGNORE_INDEX
    assert masked.shape == labels.shape == (captions, length)
    # Labels are the original ids exactly where selected; nothing else changes.
    assert np.array_equal(labels[selected], np.broadcast_to(ids, selected.shape)[selected])
    assert np.array_equal(masked[~selected], np.broadcast_to(ids, selected.shape)[~selected])
    assert not selected[:, [0, 11, 12, 13]].any(), "special tokens must never be selected"
    assert selected.sum(axis=1).min() >= 1, "every caption needs at least one MLM target"
    # Expected selected fraction: p plus the forced pick when none was drawn, (1 - p)^k / k for k tokens.
    # 40k Bernoulli draws: standard error ~0.002, so 0.01 is a 5-sigma bound.
    expected = 0.15 + 0.85**words / words
    assert abs(selected[:, 1:11].mean() - expected) < 0.01
    chosen = masked[selected]
    original = np.broadcast_to(ids, selected.shape)[selected]
    # About 6800 selected tokens: standard error of each share below 0.005, bound 0.025.
    assert abs(np.mean(chosen == tokenizer.mask_id) - 0.8) < 0.025
    kept = np.mean(chosen == original)
    randomized = np.mean((chosen != original) & (chosen != tokenizer.mask_id))
    # A random replacement can draw the original token (1 in vocab_size - 5), which counts as kept.
    assert abs(kept - 0.1) < 0.025 and abs(randomized - 0.1) < 0.025
    assert np.all((chosen == tokenizer.mask_id) | ~np.isin(chosen, tokenizer.special_ids))


def test_mlm_probability_zero_selects_nothing() -> None:
    tokenizer = load_tokenizer("builtin")
    ids = np.array([3, 5, 6, 7, 4, 0])
    masked, labels = mask_tokens(ids, tokenizer, 0.0, np.random.default_rng(0))
    assert np.array_equal(masked, ids) and np.all(labels == IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------- loader


def take(loader, count: int) -> list[dict[str, torch.Tensor]]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_batches_have_the_documented_keys_shapes_and_ranges() -> None:
    batch = next(iter(build_train_loader(make_config(), 0, 1)))
    assert set(batch) == BATCH_KEYS
    assert batch["pixel_values"].shape == (16, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
    for name in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        assert batch[name].shape == (16, 32) and batch[name].dtype == torch.int64, name
    assert batch["index"].shape == (16,) and batch["index"].dtype == torch.int64
    assert torch.equal(batch["attention_mask"], (batch["input_ids"] != 0).long())


def test_stream_follows_seeded_epoch_permutations() -> None:
    loader = build_train_loader(make_config(), 0, 1)
    indices = torch.cat([batch["index"] for batch in take(loader, 5)]).tolist()  # 80 positions, 2 epochs of 40
    expected = [int(epoch_permutation(7, p // 40, 40)[p % 40]) for p in range(80)]
    assert indices == expected
    assert sorted(indices[:40]) == list(range(40)) and indices[:40] != indices[40:]


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    first = take(build_train_loader(make_config(), 0, 1), 3)
    second = take(build_train_loader(make_config(), 0, 1), 3)
    for a, b in zip(first, second, strict=True):
        assert_batches_equal(a, b)
    other_cfg = make_config()
    other_cfg.train.seed = 8
    other = next(iter(build_train_loader(other_cfg, 0, 1)))
    assert not torch.equal(other["index"], first[0]["index"])


@pytest.mark.parametrize("dp_size", [2, 4])
def test_ranks_concatenate_to_the_single_rank_batch(dp_size: int) -> None:
    reference = take(build_train_loader(make_config(), 0, 1), 4)  # steps 2-3 cross the epoch boundary at 40
    per_rank = [take(build_train_loader(make_config(), rank, dp_size), 4) for rank in range(dp_size)]
    for step, expected in enumerate(reference):
        local = [batches[step] for batches in per_rank]
        assert all(batch["index"].shape == (16 // dp_size,) for batch in local)
        assert_batches_equal({k: torch.cat([b[k] for b in local]) for k in expected}, expected)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_ranks_share_every_microbatch_like_a_single_process(dp_size: int) -> None:
    # With accumulation over 2 microbatches, microbatch m of every layout must hold the samples of a single
    # process's microbatch m (the contrastive loss compares samples within a microbatch).
    cfg = make_config()
    cfg.train.grad_accum = 2
    reference = next(iter(build_train_loader(cfg, 0, 1)))["index"].tensor_split(2)
    local = [next(iter(build_train_loader(cfg, rank, dp_size)))["index"].tensor_split(2) for rank in range(dp_size)]
    for m, expected in enumerate(reference):
        assert torch.equal(torch.cat([pieces[m] for pieces in local]), expected)
    whole = next(iter(build_train_loader(make_config(), 0, 1)))["index"]
    assert torch.equal(torch.cat(reference), whole), "accumulation must not change the step's samples"


def test_global_batch_must_split_over_ranks() -> None:
    with pytest.raises(ValueError, match=r"train\.global_batch_size \(16\).*3"):
        build_train_loader(make_config(), 0, 3)


def test_resume_gives_exactly_the_next_batch() -> None:
    uninterrupted = take(build_train_loader(make_config(), 0, 1), 5)
    loader = build_train_loader(make_config(), 0, 1)
    take(loader, 3)
    state = loader.state_dict()
    assert state == {"step": 3, "skipped": 0}
    resumed = build_train_loader(make_config(), 1, 2)  # a different layout resumes the same stream
    resumed.load_state_dict(state)
    other_half = build_train_loader(make_config(), 0, 2)
    other_half.load_state_dict(state)
    for step in (3, 4):
        halves = [next(iter(other_half)), next(iter(resumed))]
        assert_batches_equal({k: torch.cat([h[k] for h in halves]) for k in halves[0]}, uninterrupted[step])
    assert resumed.state_dict()["step"] == 5


def test_background_workers_give_identical_batches() -> None:
    expected = take(build_train_loader(make_config(), 1, 2), 4)
    loader = build_train_loader(make_config(num_workers=2), 1, 2)
    for actual, reference in zip(take(loader, 4), expected, strict=True):
        assert_batches_equal(actual, reference)
    assert loader.state_dict()["step"] == 4


def test_augmentation_preserves_the_image_and_eval_has_none() -> None:
    cfg = make_config()
    train_batch = next(iter(build_train_loader(cfg, 0, 1)))
    plain_cfg = make_config(augment=False)
    plain_batch = next(iter(build_train_loader(plain_cfg, 0, 1)))
    assert torch.equal(train_batch["index"], plain_batch["index"])
    index = int(plain_batch["index"][0])
    image = render_shapes("train", index, 32, 2)[0]
    reference = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0
    # float32 normalisation of uint8 values: rounding differs by at most a few ulps of 1.0.
    torch.testing.assert_close(plain_batch["pixel_values"][0], reference, rtol=0, atol=1e-6)
    difference = (train_batch["pixel_values"] - plain_batch["pixel_values"]).abs()
    assert difference.mean() > 0.01, "augmentation had no effect"
    # Jitter is mild (brightness 0.1, contrast 20%, noise 0.02 in [0, 1] units): the mean change stays small.
    assert difference.mean() < 0.3
    eval_batch = next(iter(build_eval_loader(cfg, 4)))
    eval_image = render_shapes("eval", 0, 32, 2)[0]
    eval_reference = torch.from_numpy(eval_image).permute(2, 0, 1).float() / 127.5 - 1.0
    torch.testing.assert_close(eval_batch["pixel_values"][0], eval_reference, rtol=0, atol=1e-6)


def test_eval_loader_covers_the_split_in_order_with_fixed_masking() -> None:
    loader = build_eval_loader(make_config(), 5)
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [5, 5, 2] and len(loader) == 3
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(12))
    other_seed = make_config()
    other_seed.train.seed = 123
    for a, b in zip(batches, build_eval_loader(other_seed, 5), strict=True):
        assert_batches_equal(a, b)
    # Masking depends on the sample alone, not on the eval batch size.
    (whole,) = build_eval_loader(make_config(), 12)
    assert_batches_equal(whole, {k: torch.cat([b[k] for b in batches]) for k in whole})
    assert (torch.cat([b["mlm_labels"] for b in batches]) != IGNORE_INDEX).any()


def test_resize_and_grey_images() -> None:
    cfg = make_config()
    cfg.model.image_size, cfg.model.channels, cfg.model.patch_size = 40, 1, 8
    source = ShapesSource("train", 4, 32, 2)  # rendered at 32, resized to 40
    dataset = ImageTextDataset(source, load_tokenizer("builtin"), cfg, augment=False)
    batch, skipped = dataset.batch([0, 1], [(0,), (1,)])
    assert batch["pixel_values"].shape == (2, 1, 40, 40) and skipped == 0
    grey = np.asarray(Image.fromarray(source.load(0)[0]).convert("L").resize((40, 40), Image.Resampling.BICUBIC))
    # float32 normalisation computed in a different order: equal up to a few ulps of 1.0.
    torch.testing.assert_close(
        batch["pixel_values"][0, 0], torch.from_numpy(grey.astype(np.float32) / 127.5 - 1.0), rtol=0, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------------- shards


def test_shapes_shards_round_trip_equals_generation(tmp_path) -> None:
    description = write_shapes_shards(tmp_path, 40, 12, image_size=32, max_shapes=2, samples_per_shard=16)
    assert description["train_shards"] == str(tmp_path / "train-{000000..000002}.tar")
    assert description["eval_shards"] == str(tmp_path / "eval-000000.tar")
    assert json.loads((tmp_path / "dataset.json").read_text()) == description
    shards = IndexedShards(description["train_shards"])
    assert len(shards) == 40
    for index in (0, 15, 16, 39):
        image, caption = shards.load(index)
        expected_image, expected_caption = render_shapes("train", index, 32, 2)
        assert np.array_equal(image, expected_image) and caption == expected_caption
    from_shards = make_config(
        source="shards", train_shards=description["train_shards"], eval_shards=description["eval_shards"]
    )
    for actual, expected in zip(
        take(build_train_loader(from_shards, 0, 1), 3), take(build_train_loader(make_config(), 0, 1), 3), strict=True
    ):
        # The ids differ by design: (shard << 32) | member for shards (16 per shard here), the index for shapes.
        shard_ids = actual.pop("sample_id")
        assert torch.equal(shard_ids, ((actual["index"] // 16) << 32) | (actual["index"] % 16))
        assert torch.equal(expected.pop("sample_id"), expected["index"])
        assert_batches_equal(actual, expected)
    for actual, expected in zip(build_eval_loader(from_shards, 8), build_eval_loader(make_config(), 8), strict=True):
        actual.pop("sample_id"), expected.pop("sample_id")
        assert_batches_equal(actual, expected)


def test_no_eval_shards_means_no_eval_loader(tmp_path) -> None:
    description = write_shapes_shards(tmp_path, 8, 1, samples_per_shard=8)
    assert build_eval_loader(make_config(source="shards", train_shards=description["train_shards"]), 4) is None


def test_missing_shards_error_names_the_pattern(tmp_path) -> None:
    pattern = str(tmp_path / "train-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="4 of 4 files missing") as error:
        IndexedShards(pattern)
    assert pattern in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"data\.train_shards"):
        build_train_loader(make_config(source="shards"), 0, 1)


def test_bad_samples_are_substituted_and_counted(tmp_path) -> None:
    good = [render_shapes("train", i, 32, 2) for i in range(8)]
    samples = [(png_bytes(image), "png", caption) for image, caption in good]
    samples[2] = (b"\x89PNG\r\n\x1a\n not really a png", "png", good[2][1])  # corrupt image
    samples[5] = (png_bytes(good[5][0]), "png", "   ")  # empty caption
    samples[6] = (png_bytes(good[6][0])[:60], "png", good[6][1])  # truncated image
    pattern = write_shards(samples, tmp_path, "train", per_shard=4)
    shards = IndexedShards(pattern)
    for index in (2, 5, 6):
        with pytest.raises(BadSample):
            shards.load(index)
    cfg = make_config(source="shards", train_shards=pattern, augment=False)
    cfg.train.global_batch_size = 8  # one step = one epoch: every index is asked for once
    loader = build_train_loader(cfg, 0, 1)
    batch = next(iter(loader))
    # 2 -> 3 (1 skipped), 5 -> 7 (5 and 6 skipped), 6 -> 7 (1 skipped): the next good index, same on every rank.
    assert sorted(batch["index"].tolist()) == [0, 1, 3, 3, 4, 7, 7, 7]
    assert loader.skipped == 4 and loader.state_dict() == {"step": 1, "skipped": 4}
    halves = [next(iter(build_train_loader(cfg, rank, 2))) for rank in range(2)]
    assert_batches_equal({k: torch.cat([h[k] for h in halves]) for k in batch}, batch)


def test_all_bad_samples_is_an_error(tmp_path) -> None:
    pattern = write_shards([(b"junk", "png", "a caption")] * 2, tmp_path, "train", per_shard=4)
    dataset = ImageTextDataset(IndexedShards(pattern), load_tokenizer("builtin"), make_config(), augment=False)
    with pytest.raises(RuntimeError, match="none of the 2 samples"):
        dataset.batch([0], [(0,)])


def write_pairs_folder(folder) -> dict[str, str]:
    folder.mkdir()
    captions = {}
    for index in range(6):
        image, caption = render_shapes("train", index, 24, 1)
        ext = "png" if index % 2 else "jpg"
        Image.fromarray(image).save(folder / f"img{index}.{ext}")
        (folder / f"img{index}.txt").write_text(caption + "\n")
        captions[f"img{index}.{ext}"] = caption
    (folder / "orphan.txt").write_text("a caption without an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "uncaptioned.png")
    return captions


def test_pack_from_a_folder(tmp_path) -> None:
    captions = write_pairs_folder(tmp_path / "pairs")
    description = pack_pairs(tmp_path / "pairs", tmp_path / "out", samples_per_shard=2, eval_fraction=0.25)
    assert (description["train_size"], description["eval_size"]) == (4, 2)
    assert len(description["skipped"]) == 2
    assert any("orphan.txt" in p for p in description["skipped"])
    assert any("uncaptioned.png" in p for p in description["skipped"])
    train, held_out = IndexedShards(description["train_shards"]), IndexedShards(description["eval_shards"])
    packed = {}
    for shards in (train, held_out):
        for index in range(len(shards)):
            image_bytes, ext, caption = shards.raw(index)
            name = next(name for name, text in captions.items() if text == caption)
            assert image_bytes == (tmp_path / "pairs" / name).read_bytes() and name.endswith(ext)
            packed[name] = caption
    assert packed == captions


def test_pack_from_a_csv_reports_missing_images(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    rows = []
    for index in range(3):
        image, caption = render_shapes("eval", index, 24, 2)
        Image.fromarray(image).save(tmp_path / "images" / f"{index}.png")
        rows.append({"image": f"images/{index}.png", "caption": caption})
    rows.append({"image": "images/missing.png", "caption": "gone"})
    with open(tmp_path / "pairs.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    description = pack_pairs(tmp_path / "pairs.csv", tmp_path / "out", samples_per_shard=10, eval_fraction=0.0)
    assert (description["train_size"], description["eval_size"], description["eval_shards"]) == (3, 0, "")
    assert len(description["skipped"]) == 1 and "missing.png" in description["skipped"][0]
    shards = IndexedShards(description["train_shards"])
    for index in range(3):
        image, caption = shards.load(index)
        assert caption == rows[index]["caption"]
        assert np.array_equal(image, render_shapes("eval", index, 24, 2)[0])
    (tmp_path / "bad.csv").write_text("path,text\nx.png,hello\n")
    with pytest.raises(ValueError, match="image,caption"):
        pack_pairs(tmp_path / "bad.csv", tmp_path / "out2", 10, 0.0)


# ------------------------------------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigmodel")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_make_shapes_show_and_train_tokenizer(tmp_path, capsys) -> None:
    out = tmp_path / "shapes"
    assert run_cli(["data", "make-shapes", "--out", str(out), "--train-size", "10", "--eval-size", "4"]) == 0
    assert f"train_shards: {out}/train-000000.tar" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert run_cli(["data", "show", "--shards", str(out / "eval-000000.tar"), "--count", "3", "--out", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert f"2: {render_shapes('eval', 2, 32, 2)[1]}" in printed
    assert Image.open(grid).size == (3 * 128, 128)
    tokenizer_path = tmp_path / "tok.json"
    argv = ["data", "train-tokenizer", "--shards", str(out / "train-000000.tar"), "--out", str(tokenizer_path)]
    assert run_cli(argv) == 0
    assert load_tokenizer(str(tokenizer_path)).vocab_size > 5


def test_cli_bad_input_is_one_error_line_and_exit_code_2(tmp_path, capsys) -> None:
    assert run_cli(["data", "show", "--shards", str(tmp_path / "x-{0..1}.tar")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: shard pattern") and captured.err.count("\n") == 1
    assert run_cli(["data", "pack", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_eval_loader_class_is_usable_directly() -> None:
    dataset = ImageTextDataset(ShapesSource("eval", 3, 32, 2), load_tokenizer("builtin"), make_config(), False)
    loader = EvalLoader(dataset, batch_size=2)
    assert [b["index"].tolist() for b in loader] == [[0, 1], [2]] and loader.skipped == 0
