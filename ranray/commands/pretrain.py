"""`ranray pretrain`: face-recognition pretraining of the backbone (margin softmax, Partial FC).

    ranray pretrain --config jobs/pretrain_r50.yaml [key=value ...]
    ranray pretrain --local --config JOB.yaml scaling.num_workers=1 [key=value ...]   (this process, no Ray)
    ray job submit --working-dir . -- ranray pretrain --config jobs/pretrain_r50.yaml

The same command with the same run.name resumes that run from its newest good checkpoint, on any
worker count (the class-centre shards are re-cut to the new ranks, docs/ELASTIC.md). The result,
RUN_DIR/model/backbone.pt, is what `ranray train model.init_backbone=...` loads.
"""

from __future__ import annotations

import argparse

HELP = "pre-train the iResNet backbone on a face-recognition identity set (ArcFace/CosFace, Partial FC)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a pretrain job YAML (PretrainConfig), e.g. jobs/pretrain_r50.yaml")
    parser.add_argument("--local", action="store_true",
                        help="run in this process on CPU or one GPU, without Ray (scaling.num_workers=1): "
                             "debugging, torch-only machines")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. partial_fc.sample_rate=0.1 margin.m2=0 margin.m3=0.4")


def run(args: argparse.Namespace) -> int:
    from ranray.config import PretrainConfig, load_config
    from ranray.train.launch import run_pretraining
    from ranray.train.summary import format_table
    from ranray.train.pretrain import describe

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    result = run_pretraining(cfg, runtime="local" if args.local else "ray")  # a run that fails for good raises RunFailed: one line, exit 1 (cli.main)
    print(format_table(describe(result)))
    return 0
