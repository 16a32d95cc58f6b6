"""`ranray train`: fine-tune RAN with Ray Train from a job config plus key=value overrides.

    ranray train --config jobs/ferplus_ran_r50.yaml [key=value ...]
    ray job submit --working-dir . -- ranray train --config jobs/ferplus_ran_r50.yaml

The same command with the same run.name resumes that run from its newest good checkpoint.
"""

from __future__ import annotations

import argparse
import sys

HELP = "fine-tune RAN on a prepared dataset with Ray Train (DDP on CPU or GPU, checkpoints, MLflow)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a train job YAML (TrainConfig), e.g. jobs/ferplus_ran_r50.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. epochs=10 scaling.num_workers=4 model.rb_margin=0.05")


def run(args: argparse.Namespace) -> int:
    from ray.train import TrainingFailedError

    from ranray.config import TrainConfig, load_config
    from ranray.train.launch import describe, format_table, run_training

    cfg = load_config(TrainConfig, args.config, args.overrides)
    try:
        result = run_training(cfg)
    except TrainingFailedError as err:
        print(f"ranray train: training failed after {cfg.checkpoint.max_failures} retries: {err}", file=sys.stderr)
        return 1
    print(format_table(describe(result)))
    return 0
