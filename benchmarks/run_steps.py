"""Per-step wall time and memory of a finished run, read from its Dagster event log.

For each step: when it started, how long it ran, how long after the previous step ended it
started (the scheduling gap), and the largest `peak_rss_mib` among its materializations; then the
run's wall time, the sum of the steps and the sum of the gaps. With --metadata, the numeric
materialization metadata (kept rows, pairs, losses) is printed under each step.

    DAGSTER_HOME=$PWD/.dagster_home .venv/bin/python benchmarks/run_steps.py              # latest run
    DAGSTER_HOME=$PWD/data/experiment/dagster_home .venv/bin/python benchmarks/run_steps.py --run-id <id>

The last line is `run_steps: wall=<s> steps=<s> gaps=<s> peak_rss_mib=<MiB>`.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import dagster as dg


def _step_events(instance: dg.DagsterInstance, run_id: str):
    starts, ends, peaks, metadata = {}, {}, defaultdict(float), defaultdict(dict)
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[event.step_key] = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            ends[event.step_key] = entry.timestamp
        elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.event_specific_data.materialization
            for key, value in materialization.metadata.items():
                value = getattr(value, "value", value)
                if key == "peak_rss_mib":
                    peaks[event.step_key] = max(peaks[event.step_key], float(value))
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    metadata[event.step_key][f"{materialization.asset_key.to_user_string()}.{key}"] = value
    return starts, ends, peaks, metadata


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", help="the run to read (default: the latest)")
    parser.add_argument("--metadata", action="store_true", help="print numeric materialization metadata")
    args = parser.parse_args()

    instance = dg.DagsterInstance.get()
    if args.run_id:
        record = instance.get_run_record_by_id(args.run_id)
        if record is None:
            raise SystemExit(f"no run {args.run_id} in {instance.root_directory}")
    else:
        records = instance.get_run_records(limit=1)
        if not records:
            raise SystemExit(f"no runs in {instance.root_directory}")
        record = records[0]
    run = record.dagster_run
    starts, ends, peaks, metadata = _step_events(instance, run.run_id)
    print(f"run {run.run_id} ({run.status.value}) in {instance.root_directory}")
    print(f"{'step':62s} {'start':>8s} {'seconds':>8s} {'gap':>6s} {'peak MiB':>9s}")
    previous_end = record.start_time
    gaps = 0.0
    for step in sorted(starts, key=starts.get):
        end = ends.get(step)
        seconds = (end - starts[step]) if end else float("nan")
        # A step that started before the previous one ended ran beside it: no gap.
        gap = max(0.0, starts[step] - previous_end)
        gaps += gap
        previous_end = max(previous_end, end or starts[step])
        peak = f"{peaks[step]:9.0f}" if step in peaks else f"{'':9s}"
        print(f"{step:62s} {_clock(starts[step] - record.start_time):>8s} {seconds:8.1f} {gap:6.1f} {peak}")
        if args.metadata:
            for key, value in metadata[step].items():
                print(f"    {key} = {value:.4g}" if isinstance(value, float) else f"    {key} = {value}")
    wall = (record.end_time or previous_end) - record.start_time
    steps = sum(ends[s] - starts[s] for s in starts if s in ends)
    peak = max(peaks.values(), default=float("nan"))
    print(f"wall {_clock(wall)}, steps {_clock(steps)}, gaps {_clock(gaps)}")
    print(f"run_steps: wall={wall:.0f} steps={steps:.0f} gaps={gaps:.0f} peak_rss_mib={peak:.0f}")


if __name__ == "__main__":
    main()
