"""How long each stage of a prune goes without a progress update: where a user watches nothing move.

    PYTHONPATH=. python tools/progress_gaps.py MODEL [MODEL ...] [--ratio 0.3]

Runs the pipeline ``spa prune`` runs (latency included) with a progress callback that records
every update, and prints per stage its time, its updates and the longest stretch without one
(the stretch before a stage's first update counts to the stage before it, as a terminal shows it).
A stage silent for over a second is marked. ``PYTHONPATH`` picks which checkout of spa runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def record(model: Path, ratio: float) -> list[tuple[float, str, int, int]]:
    from spa.pipeline import CLI_RUN, AnalyzeOptions, CutOptions, PlanOptions, ScoreOptions, prune_model

    events: list[tuple[float, str, int, int]] = []
    start = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        events.append((time.perf_counter() - start, stage, done, total))

    prune_model(model, AnalyzeOptions(), ScoreOptions(), PlanOptions(ratio), CutOptions(), CLI_RUN, progress)
    events.append((time.perf_counter() - start, "end", 0, 1))
    return events


def stages(events: list[tuple[float, str, int, int]]) -> list[tuple[str, float, int, float]]:
    """(stage, seconds, updates, longest silent stretch) in the order the stages ran."""
    rows: dict[str, list[float]] = {}
    for (when, stage, _, _), (after, _, _, _) in zip(events, events[1:]):
        row = rows.setdefault(stage, [0.0, 0, 0.0])
        row[0] += after - when
        row[1] += 1
        row[2] = max(row[2], after - when)
    return [(stage, seconds, int(updates), gap) for stage, (seconds, updates, gap) in rows.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()
    import spa

    print(f"spa from {Path(spa.__file__).parent}")
    for model in args.models:
        start = time.perf_counter()
        rows = stages(record(model, args.ratio))
        print(f"== {model.name}: {time.perf_counter() - start:.1f} s")
        print(f"{'stage':<12} {'seconds':>8} {'updates':>8} {'longest silence':>16}")
        for stage, seconds, updates, gap in rows:
            mark = "  <- silent" if gap > 1.0 else ""
            print(f"{stage:<12} {seconds:8.1f} {updates:8d} {gap:15.1f}s{mark}")


if __name__ == "__main__":
    main()
