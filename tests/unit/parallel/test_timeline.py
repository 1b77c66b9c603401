"""The pipeline timeline's idle fractions: measured, replayed with instant communication, and over several steps."""

import json

import pytest

from bigmodel.engines.pipeline import Timeline
from bigmodel.parallel.timeline import (
    measured_bubble,
    normalise,
    replayed_bubble,
    steady_replayed_bubble,
    theoretical_bubble,
    write_timeline,
)


def one_f_one_b(
    forward: list[float], backward: list[float], microbatches: int, gap: float = 0.0, jitter: float = 0.0
) -> list[list[dict]]:
    """Events of a 2-stage 1F1B step with per-stage forward/backward durations and a hand-off `gap`; with `jitter`,
    stage 0's operations of the first half of the microbatches last (1 + jitter) times as long and those of the second
    half (1 - jitter) times, and stage 1's the other way round (each stage's mean stays the same)."""
    events: list[list[dict]] = [[], []]
    clock = [0.0, 0.0]
    done: dict[tuple[str, int, int], float] = {}
    order = [
        [("forward", 0), ("forward", 1)]
        + [x for i in range(microbatches) for x in (("backward", i), ("forward", i + 2))],
        [x for i in range(microbatches) for x in (("forward", i), ("backward", i))],
    ]
    order[0] = [op for op in order[0] if op[1] < microbatches]
    pending = [list(o) for o in order]
    while any(pending):
        for stage in (0, 1):
            if not pending[stage]:
                continue
            kind, i = pending[stage][0]
            need = {
                ("forward", 0): None,
                ("forward", 1): ("forward", 0, i),
                ("backward", 1): ("forward", 1, i),
                ("backward", 0): ("backward", 1, i),
            }[(kind, stage)]
            if need is not None and need not in done:
                continue
            pending[stage].pop(0)
            ready = done[need] + (gap if need[1] != stage else 0.0) if need else 0.0
            start = max(clock[stage], ready)
            scale = 1 + jitter if (i < microbatches // 2) == (stage == 0) else 1 - jitter
            clock[stage] = start + (forward if kind == "forward" else backward)[stage] * scale
            done[(kind, stage, i)] = clock[stage]
            events[stage].append({"stage": stage, "kind": kind, "microbatch": i, "start": start, "end": clock[stage]})
    return events


def test_equal_stages_without_communication_meet_the_theory():
    events = normalise(one_f_one_b([1.0, 1.0], [2.0, 2.0], 8))
    assert measured_bubble(events) == pytest.approx(theoretical_bubble(2, 8))
    assert replayed_bubble(events) == pytest.approx(theoretical_bubble(2, 8))


def test_hand_off_latency_shows_in_the_measured_but_not_the_replayed_bubble():
    events = normalise(one_f_one_b([1.0, 1.0], [2.0, 2.0], 8, gap=0.2))
    assert measured_bubble(events) > theoretical_bubble(2, 8) + 0.02
    assert replayed_bubble(events) == pytest.approx(theoretical_bubble(2, 8))


def test_an_unbalanced_stage_raises_both():
    events = normalise(one_f_one_b([1.0, 1.3], [2.0, 2.6], 8))
    assert replayed_bubble(events) == pytest.approx(measured_bubble(events))
    assert measured_bubble(events) > theoretical_bubble(2, 8) + 0.05


def test_varying_operations_raise_the_bubble_but_not_the_steady_replay():
    # Stages of equal mean, one slower in the first half of the step, the other in the second: they wait for each
    # other, as they do when single operations vary from run to run.
    events = normalise(one_f_one_b([1.0, 1.0], [2.0, 2.0], 8, jitter=0.1))
    assert replayed_bubble(events) == pytest.approx(measured_bubble(events))
    assert measured_bubble(events) > theoretical_bubble(2, 8) + 0.02
    assert steady_replayed_bubble(events) == pytest.approx(theoretical_bubble(2, 8))


def test_several_steps_report_the_median_step(tmp_path):
    steps = [one_f_one_b([1.0, 1.0], [2.0, 2.0], 8, gap=g) for g in (0.3, 0.0, 0.1)]
    summary = write_timeline(steps, "1f1b", 8, tmp_path)
    per_step = summary["measured_bubble_per_step"]
    assert summary["steps_recorded"] == 3 and per_step[1] < per_step[2] < per_step[0]
    assert summary["measured_bubble"] == per_step[2]
    assert json.loads((tmp_path / "timeline_summary.json").read_text()) == summary
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_the_loss_counts_as_the_last_stage_forward():
    timeline = Timeline()
    timeline.events = [
        {"stage": 1, "kind": "forward", "microbatch": 0, "start": 0.0, "end": 1.0},
        {"stage": 1, "kind": "backward", "microbatch": 0, "start": 1.0, "end": 2.0},
        {"stage": 1, "kind": "forward", "microbatch": 1, "start": 2.0, "end": 3.0},
    ]
    timeline.extend_forward(1)  # not recording: nothing changes
    assert timeline.events[2]["end"] == 3.0
    timeline.recording = True
    timeline.extend_forward(1)
    assert timeline.events[2]["end"] > 3.0 and timeline.events[0]["end"] == 1.0
