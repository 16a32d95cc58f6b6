"""`ranray tune`: Ray Tune ASHA search over the RB margin and the learning rate."""

from __future__ import annotations

import argparse

HELP = "hyperparameter search (Ray Tune, ASHA) over the RB margin and learning rate; re-run to resume"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a tune job YAML, e.g. jobs/tune_asha.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. num_samples=8 space.lr_max=0.1")


def run(args: argparse.Namespace) -> int:
    from ranray.tune import FAILED, format_table, plan_search, run_search

    plan = plan_search(args.config, args.overrides)  # every config error surfaces before Ray starts
    result = run_search(plan)
    print(format_table(result.rows, plan))
    for row in result.rows:
        if row.error:
            print(f"trial {row.trial_id} failed: {row.error}")
    print(f"\ntrial table: {result.table_csv}")
    if result.best is not None:
        print(f"best trial:  {result.best.trial_id}  {plan.cfg.metric}={result.best.best_metric:.4f}  "
              f"{result.best.params}")
        print(f"best config: {result.best_config}")
        print(f"best checkpoint: {result.best.checkpoint or '(none kept)'}")
        print(f"plot:        {result.plot}")
    print(f"MLflow:      parent run {result.parent_run_id} in {result.tracking_uri}")
    if result.interrupted:
        print(f"\nsearch interrupted; run the same command again to resume {plan.experiment_dir}")
        return 130
    failed = [row for row in result.rows if row.status == FAILED]
    if failed:
        print(f"\n{len(failed)} of {len(result.rows)} trials failed (see above); the others' results stand")
        return 1
    return 0 if result.best is not None else 1
