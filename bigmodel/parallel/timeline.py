"""A pipeline step's timeline: when each rank ran each stage's forward and backward per microbatch, its idle
(bubble) fraction beside the schedule's theory, as a PNG and as a Chrome trace (chrome://tracing, Perfetto)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLOURS = {"forward": "#4C72B0", "backward": "#55A868", "backward_weight": "#DD8452"}


def theoretical_bubble(stages: int, microbatches: int) -> float:
    """Idle fraction of GPipe / 1F1B with equal stages and no communication cost: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def normalise(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Events of all ranks (each with stage, kind, microbatch, start, end in seconds of a clock shared by the
    processes of one machine), with a `rank` and times in milliseconds from the step's first event."""
    origin = min(e["start"] for events in per_rank for e in events)
    return [
        e | {"rank": rank, "start": (e["start"] - origin) * 1e3, "end": (e["end"] - origin) * 1e3}
        for rank, events in enumerate(per_rank)
        for e in events
    ]


def measured_bubble(events: list[dict[str, Any]]) -> float:
    """Idle fraction of the ranks between the step's first start and last end."""
    ranks = {e["rank"] for e in events}
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    busy = sum(e["end"] - e["start"] for e in events)
    return 1.0 - busy / (span * len(ranks))


def replayed_bubble(events: list[dict[str, Any]]) -> float:
    """Idle fraction if every rank ran its recorded operations, in their recorded order and durations, with
    instant communication: the bubble the schedule and the stage imbalance alone explain.

    Dependencies: a stage's forward of microbatch i waits for the previous stage's; its backward waits for the next
    stage's backward of i (the last stage's for its own forward); a weight-gradient step waits for its backward.
    """
    last_stage = max(e["stage"] for e in events)
    done: dict[tuple[str, int, int], float] = {}
    queues = {
        r: sorted((e for e in events if e["rank"] == r), key=lambda e: e["start"]) for r in {e["rank"] for e in events}
    }
    clock = dict.fromkeys(queues, 0.0)
    pending = {r: list(q) for r, q in queues.items()}

    def ready_at(e: dict[str, Any]) -> float | None:
        s, i = e["stage"], e["microbatch"]
        needs = {
            "forward": [("forward", s - 1, i)] if s > 0 else [],
            "backward": [("backward", s + 1, i)] if s < last_stage else [("forward", s, i)],
            "backward_weight": [("backward", s, i)],
        }[e["kind"]]
        if any(n not in done for n in needs):
            return None
        return max((done[n] for n in needs), default=0.0)

    while any(pending.values()):
        progressed = False
        for rank, ops in pending.items():
            if ops and (at := ready_at(ops[0])) is not None:
                e = ops.pop(0)
                clock[rank] = max(clock[rank], at) + (e["end"] - e["start"])
                done[(e["kind"], e["stage"], e["microbatch"])] = clock[rank]
                progressed = True
        if not progressed:
            raise ValueError("the recorded operations cannot be replayed in order (a dependency never completes)")
    busy = sum(e["end"] - e["start"] for e in events)
    return 1.0 - busy / (max(clock.values()) * len(queues))


def steady_replayed_bubble(events: list[dict[str, Any]]) -> float:
    """replayed_bubble with every operation lasting its rank's mean for its kind: what the schedule, the stage split
    and the forward/backward ratio explain without the machine's run-to-run variation of single operations."""
    means = {}
    for rank, kind in {(e["rank"], e["kind"]) for e in events}:
        durations = [e["end"] - e["start"] for e in events if e["rank"] == rank and e["kind"] == kind]
        means[(rank, kind)] = sum(durations) / len(durations)
    return replayed_bubble([e | {"end": e["start"] + means[(e["rank"], e["kind"])]} for e in events])


def chrome_trace(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The events in Chrome's trace-event format (one row per pipeline rank, times in microseconds)."""
    trace = [
        {
            "name": f"{e['kind'][0].upper()}{e['microbatch']}",
            "cat": e["kind"],
            "ph": "X",
            "ts": e["start"] * 1e3,
            "dur": (e["end"] - e["start"]) * 1e3,
            "pid": 0,
            "tid": e["rank"],
            "args": {"stage": e["stage"], "microbatch": e["microbatch"]},
        }
        for e in events
    ]
    names = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"pp rank {r}"}} for r in
             sorted({e["rank"] for e in events})]  # fmt: skip
    return {"traceEvents": names + trace, "displayTimeUnit": "ms"}


def draw(events: list[dict[str, Any]], title: str, path: Path) -> None:
    """A Gantt chart of the events, one row per pipeline rank, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({e["rank"] for e in events})
    fig, ax = plt.subplots(figsize=(12, 0.8 + 0.6 * len(ranks)))
    for e in events:
        width = e["end"] - e["start"]
        ax.broken_barh([(e["start"], width)], (e["rank"] - 0.4, 0.8), facecolors=COLOURS[e["kind"]])
        label = (
            f"{e['microbatch']}"
            if len({x["stage"] for x in events}) == len(ranks)
            else f"{e['stage']}:{e['microbatch']}"
        )
        ax.text(e["start"] + width / 2, e["rank"], label, ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time in the step (ms)")
    ax.set_title(title, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for k, c in COLOURS.items() if any(e["kind"] == k for e in events)]
    ax.legend(handles, [k for k in COLOURS if any(e["kind"] == k for e in events)], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_timeline(steps: list[list[list[dict[str, Any]]]], schedule: str, microbatches: int, out_dir: Path) -> dict:
    """Write timeline.png, timeline.json (Chrome trace) and timeline_summary.json into `out_dir` and return the
    summary. `steps` holds, per recorded step, each pipeline rank's events. The summary's idle fractions (measured,
    replayed) are the median step's, with every step's listed beside; the picture and the trace show that step."""
    per_step = [normalise(per_rank) for per_rank in steps]
    ranks = len(steps[0])
    measured = [measured_bubble(events) for events in per_step]
    median_index = sorted(range(len(measured)), key=measured.__getitem__)[(len(measured) - 1) // 2]
    events, theory = per_step[median_index], theoretical_bubble(ranks, microbatches)
    recorded = f"median of {len(steps)} steps, " if len(steps) > 1 else ""
    title = (f"{schedule}, {ranks} pipeline ranks, {microbatches} microbatches: idle {measured[median_index]:.1%} "
             f"({recorded}theory for equal stages (p-1)/(m+p-1) = {theory:.1%})")  # fmt: skip
    draw(events, title, out_dir / "timeline.png")
    (out_dir / "timeline.json").write_text(json.dumps(chrome_trace(events)), encoding="utf-8")
    summary = {
        "schedule": schedule,
        "ranks": ranks,
        "microbatches": microbatches,
        "measured_bubble": measured[median_index],
        "theoretical_bubble": theory,
        "replayed_bubble": replayed_bubble(events),
        "steady_replayed_bubble": steady_replayed_bubble(events),
        "busy_ms_per_rank": [sum(e["end"] - e["start"] for e in events if e["rank"] == r) for r in range(ranks)],
        "steps_recorded": len(steps),
        "measured_bubble_per_step": measured,
        "replayed_bubble_per_step": [replayed_bubble(e) for e in per_step],
    }
    (out_dir / "timeline_summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
