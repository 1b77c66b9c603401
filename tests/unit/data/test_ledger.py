"""The sample ledger on hand-built runs: records survive a torn tail, a resume drops the steps it re-runs, and
`audit_runs` / `bigmodel data audit` agree across layouts or name the first step, position, ranks and samples where
two runs differ."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bigmodel.cli.main import main as cli_main
from bigmodel.config import load_config
from bigmodel.data import GlobalBatchLoader, build_train_loader
from bigmodel.data.ledger import (
    LEDGER_DIR,
    Layout,
    Ledger,
    RunLedger,
    audit_runs,
    hash_hex,
    rank_file,
    read_records,
)

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
BATCH = 16
SHARDS = [f"s3://bucket/train-{n:06d}.tar" for n in range(4)]


def stream(step: int) -> np.ndarray:
    """The (BATCH,) sample ids of `step` in global order: shard (p % 4), member (step * 100 + p)."""
    positions = np.arange(BATCH)
    return ((positions % 4) << 32) | (step * 100 + positions)


def alone(value):
    """The gather of a single process (or of one rank driven alone: the main rank sees only its own share)."""
    return [value]


def write_run(
    run: Path, dp: int, microbatches: int, steps: range, ids=stream, urls=SHARDS, start: int = 0, entry=None
) -> list[Ledger]:
    """Each of `dp` ranks of a run records its slice of `ids(step)` for `steps` (no sync: one rank per ledger)."""
    ledgers = []
    for rank in range(dp):
        ledger = Ledger(run / LEDGER_DIR, Layout(1, dp, microbatches, BATCH), rank, True, rank == 0, alone)
        ledger.open(start, entry, urls)
        ledgers.append(ledger)
    for step in steps:
        for rank, ledger in enumerate(ledgers):
            ledger.record(step, ids(step)[ledger.layout.positions(rank)])
    return ledgers


@pytest.mark.parametrize(("dp", "microbatches"), [(1, 1), (4, 1), (2, 2), (2, 4)])
def test_positions_are_where_the_loader_puts_each_rank(dp, microbatches):
    # The ledger's global order must be the loader's: rank r's rows are stream positions step * G + positions(r).
    cfg = load_config(TINY, [f"--train.global_batch_size={BATCH}", f"--train.grad_accum={microbatches}"])
    for rank in range(dp):
        loader = GlobalBatchLoader(build_train_loader(cfg).dataset, BATCH, rank, dp, microbatches=microbatches)
        positions = Layout(1, dp, microbatches, BATCH).positions(rank)
        assert (3 * BATCH + positions).tolist() == loader.local_positions(3)
    assert Layout(1, 2, 2, 16).positions(1).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


def test_single_process_ledger_round_trip(tmp_path):
    (ledger,) = write_run(tmp_path, 1, 1, range(1, 4))
    entry = ledger.sync()
    ledger.close()
    steps = list(RunLedger(tmp_path).steps())
    assert [s.step for s in steps] == [1, 2, 3]
    assert all((s.ids == stream(s.step)).all() and (s.ranks == 0).all() for s in steps)
    written = [json.loads(line) for line in (tmp_path / LEDGER_DIR / "steps.jsonl").read_text().splitlines()]
    assert written == [{"step": s.step, "hash": hash_hex(s.hash)} for s in steps]
    assert entry == {"step": 3, "hash": hash_hex(sum(s.hash for s in steps))}
    assert (tmp_path / LEDGER_DIR / "shards.txt").read_text().splitlines() == SHARDS
    # 24 bytes of header and 8 per sample, per step.
    assert rank_file(tmp_path / LEDGER_DIR, 0).stat().st_size == 3 * (24 + 8 * BATCH)


def test_a_torn_or_corrupt_last_record_is_ignored(tmp_path):
    write_run(tmp_path, 1, 1, range(1, 4))[0].close()
    path = rank_file(tmp_path / LEDGER_DIR, 0)
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # killed in the middle of writing step 3
    assert [r.step for _, r in read_records(path)] == [1, 2]
    corrupt = bytearray(whole)
    corrupt[-1] ^= 0xFF  # one id of step 3 changed after its hash was taken
    path.write_bytes(bytes(corrupt))
    assert [r.step for _, r in read_records(path)] == [1, 2]


def test_resume_drops_the_steps_it_reruns_and_checks_the_checkpoint(tmp_path):
    (first,) = write_run(tmp_path / "resumed", 1, 1, range(1, 4))
    entry = first.sync()  # the checkpoint of step 3
    for step in (4, 5):  # recorded, then killed before the next checkpoint: no close, no sync
        first.record(step, stream(step))
    (resumed,) = write_run(tmp_path / "resumed", 1, 1, range(4, 7), start=3, entry=entry)
    assert resumed.sync() == write_run(tmp_path / "whole", 1, 1, range(1, 7))[0].sync()
    records = [r.step for _, r in read_records(rank_file(tmp_path / "resumed" / LEDGER_DIR, 0))]
    assert records == [1, 2, 3, 4, 5, 6]
    assert audit_runs(tmp_path / "whole", tmp_path / "resumed").agree

    # A checkpoint whose chain hash the files do not reproduce is named in one line.
    other = Ledger(tmp_path / "resumed" / LEDGER_DIR, Layout(1, 1, 1, BATCH), 0, True, True, alone)
    note = other.open(3, {"step": 3, "hash": "0" * 16}, SHARDS)
    assert note is not None and "does not match the checkpoint of step 3" in note and "\n" not in note


def test_a_fresh_start_clears_an_old_ledger(tmp_path):
    write_run(tmp_path, 2, 1, range(1, 5))
    write_run(tmp_path, 1, 1, range(1, 3))
    assert [s.step for s in RunLedger(tmp_path).steps()] == [1, 2]
    assert [r.step for _, r in read_records(rank_file(tmp_path / LEDGER_DIR, 1))] == []
    layouts = (tmp_path / LEDGER_DIR / "layout.jsonl").read_text().splitlines()
    assert [json.loads(line)["dp_size"] for line in layouts] == [1]


def test_audit_agrees_across_layouts_and_a_resume_in_another_layout(tmp_path):
    write_run(tmp_path / "dp1", 1, 1, range(1, 7))
    write_run(tmp_path / "dp4", 4, 1, range(1, 7))
    # Two ranks with two microbatches for steps 1-3, then resumed on four ranks.
    write_run(tmp_path / "mixed", 2, 2, range(1, 6))
    write_run(tmp_path / "mixed", 4, 1, range(4, 7), start=3)
    for run in ("dp4", "mixed"):
        audit = audit_runs(tmp_path / "dp1", tmp_path / run)
        assert audit.agree and audit.agreed == list(range(1, 7)), audit
        assert audit.lines("A", "B") == [f"runs agree on steps 1..6 ({6 * BATCH} samples)"]


def test_audit_names_the_first_difference(tmp_path):
    def swapped(step: int) -> np.ndarray:
        ids = stream(step)
        if step >= 3:
            ids[9] = (3 << 32) | 777  # from step 3 on, position 9 holds another sample
        return ids

    write_run(tmp_path / "a", 4, 1, range(1, 7))
    write_run(tmp_path / "b", 2, 2, range(1, 7), ids=swapped)
    audit = audit_runs(tmp_path / "a", tmp_path / "b")
    assert not audit.agree
    assert audit.agreed == [1, 2]
    d = audit.difference
    # Position 9: four ranks of four samples put it on rank 2; two microbatches of 8 over two ranks on rank 0.
    assert (d.step, d.position, d.rank_a, d.rank_b) == (3, 9, 2, 0)
    assert (d.sample_a, d.sample_b) == (f"{SHARDS[1]} member 309", f"{SHARDS[3]} member 777")
    assert audit.lines("A", "B")[-1] == (
        f"runs differ at step 3, position 9 of the global batch: A has {SHARDS[1]} member 309 (rank 2), "
        f"B has {SHARDS[3]} member 777 (rank 0)"
    )


def test_audit_compares_samples_by_shard_url(tmp_path):
    # Run b lists the same shards in another order (its ids number them differently): the same samples.
    order = [2, 0, 3, 1]
    renumbered = [SHARDS[n] for n in order]

    def same_samples(step: int) -> np.ndarray:
        ids = stream(step)
        return (np.array([order.index(n) for n in range(4)])[ids >> 32] << 32) | (ids & 0xFFFFFFFF)

    write_run(tmp_path / "a", 1, 1, range(1, 3))
    write_run(tmp_path / "b", 2, 1, range(1, 3), ids=same_samples, urls=renumbered)
    assert audit_runs(tmp_path / "a", tmp_path / "b").agree
    # A shard pointing elsewhere: every sample of it differs, and the audit names both URLs.
    elsewhere = [url.replace("train-000001", "other-000001") for url in SHARDS]
    write_run(tmp_path / "c", 1, 1, range(1, 3), urls=elsewhere)
    d = audit_runs(tmp_path / "a", tmp_path / "c").difference
    assert (d.step, d.position, d.sample_a, d.sample_b) == (
        1,
        1,
        f"{SHARDS[1]} member 101",
        f"{elsewhere[1]} member 101",
    )


def test_audit_reports_steps_only_one_run_has_and_incomplete_steps(tmp_path):
    write_run(tmp_path / "long", 1, 1, range(1, 7))
    ledgers = write_run(tmp_path / "short", 2, 1, range(1, 5))
    ledgers[0].record(5, stream(5)[ledgers[0].layout.positions(0)])  # killed before rank 1 wrote step 5
    audit = audit_runs(tmp_path / "long", tmp_path / "short")
    assert audit.agree and audit.only_a == [5, 6] and audit.only_b == []
    assert audit.lines("L", "S") == [
        f"{tmp_path / 'short'}: rank 1 has no record of step 5; later steps are not read",
        f"runs agree on steps 1..4 ({4 * BATCH} samples)",
        "steps 5..6 only in L",
    ]


def test_shapes_samples_are_named_by_index(tmp_path):
    write_run(tmp_path / "a", 1, 1, range(1, 2), urls=[])
    write_run(tmp_path / "b", 1, 1, range(1, 2), ids=lambda step: stream(step)[::-1].copy(), urls=[])
    assert not (tmp_path / "a" / LEDGER_DIR / "shards.txt").exists()
    d = audit_runs(tmp_path / "a", tmp_path / "b").difference
    assert (d.sample_a, d.sample_b) == (f"index {int(stream(1)[0])}", f"index {int(stream(1)[-1])}")


def test_audit_command(tmp_path, capsys):
    write_run(tmp_path / "a", 1, 1, range(1, 3))
    write_run(tmp_path / "b", 4, 1, range(1, 3))
    write_run(tmp_path / "c", 1, 1, range(1, 3), ids=lambda step: stream(step + 1))
    assert cli_main(["data", "audit", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out == f"runs agree on steps 1..2 ({2 * BATCH} samples)\n"
    assert cli_main(["data", "audit", str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert capsys.readouterr().out.startswith("runs differ at step 1, position 0 of the global batch:")
    os.makedirs(tmp_path / "empty")
    assert cli_main(["data", "audit", str(tmp_path / "a"), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'empty'} has no ledger") and err.count("\n") == 1


@pytest.mark.parametrize("dp", [1, 3])
def test_record_sizes(tmp_path, dp):
    # The header of a record says how many ids follow; a rank records exactly its share of the global batch.
    batch = 12
    ledger = Ledger(tmp_path / LEDGER_DIR, Layout(1, dp, 1, batch), 0, True, True, alone)
    ledger.open(0, None, [])
    ledger.record(1, np.arange(batch // dp))
    ledger.close()
    assert [len(r.ids) for _, r in read_records(rank_file(tmp_path / LEDGER_DIR, 0))] == [batch // dp]
