"""`ranray train`: fine-tune RAN with Ray Train from a job config plus key=value overrides.

    ranray train --config jobs/ferplus_ran_r50.yaml [key=value ...]
    ranray train --local --config JOB.yaml scaling.num_workers=1 [key=value ...]   (this process, no Ray)
    ray job submit --working-dir . -- ranray train --config jobs/ferplus_ran_r50.yaml

The same command with the same run.name resumes that run from its newest good checkpoint.
"""

from __future__ import annotations

import argparse

HELP = "fine-tune RAN on a prepared dataset with Ray Train (DDP on CPU or GPU, checkpoints, MLflow)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a train job YAML (TrainConfig), e.g. jobs/ferplus_ran_r50.yaml")
    parser.add_argument("--local", action="store_true",
                        help="run in this process on CPU or one GPU, without Ray (scaling.num_workers=1): "
                             "debugging, torch-only machines")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. epochs=10 scaling.num_workers=4 loss.rb_margin=0.05")


def run(args: argparse.Namespace) -> int:
    from ranray.config import TrainConfig, load_config
    from ranray.train.launch import describe, run_training
    from ranray.train.summary import format_table

    cfg = load_config(TrainConfig, args.config, args.overrides)
    result = run_training(cfg, runtime="local" if args.local else "ray")  # a run that fails for good raises RunFailed: one line, exit 1 (cli.main)
    print(format_table(describe(result)))
    return 0
