"""Materializes assets in a process of its own, for the crash-resume tests: the test kills this
process with SIGKILL in the middle of generation.

--slow-batch-seconds makes every generation batch take at least that long (the tiny model writes a
batch in a fraction of a second, faster than a test can watch the table grow), so the kill lands
between batch commits as it would on a real model; --slow-train-step-seconds does the same for each
optimizer step of the trainers, so a kill lands between checkpoints.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def slow_down_generation(seconds: float) -> None:
    from refine_af_pipeline.llm.transformers_backend import TransformersModel

    real = TransformersModel.generate

    def slow(*args, **kwargs):
        started = time.monotonic()
        out = real(*args, **kwargs)
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        return out

    TransformersModel.generate = slow


def slow_down_training(seconds: float) -> None:
    from refine_af_pipeline.training import checkpoints, rl, sft

    def slow_counter():
        counter = checkpoints.step_counter()
        counted = counter.on_step_end

        def on_step_end(*args, **kwargs):
            time.sleep(seconds)
            return counted(*args, **kwargs)

        counter.on_step_end = on_step_end
        return counter

    rl.step_counter = sft.step_counter = slow_counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--select", required=True, help="comma-separated asset names")
    parser.add_argument("--run-config", default="{}", help="JSON: op name -> config")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--slow-batch-seconds", type=float, default=0.0)
    parser.add_argument("--slow-train-step-seconds", type=float, default=0.0)
    args = parser.parse_args()
    if args.slow_batch_seconds:
        slow_down_generation(args.slow_batch_seconds)
    if args.slow_train_step_seconds:
        slow_down_training(args.slow_train_step_seconds)
    from pipeline_helpers import materialize

    result = materialize(
        Path(args.data_dir),
        args.model,
        json.loads(args.run_config),
        selection=args.select.split(","),
        batch_size=args.batch_size,
    )
    print(json.dumps({"success": result.success, "run_id": result.run_id}), flush=True)


if __name__ == "__main__":
    main()
