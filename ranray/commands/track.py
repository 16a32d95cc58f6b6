"""`ranray track sync RUN_DIR`: push what a run kept locally while MLflow did not answer.

A run whose tracking server went away (or answered 500 / 401) writes its params, metrics, tags,
artifacts and status to RUN_DIR/metrics.jsonl. The run's owner pushes them itself when it ends and
the server answers again; otherwise this command does, into the run recorded in tracking.json.
"""

from __future__ import annotations

import argparse

HELP = "MLflow records of a run: `sync RUN_DIR` pushes what was kept locally while the server was away"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    sync = actions.add_parser("sync", help="push RUN_DIR/metrics.jsonl to the MLflow store")
    sync.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (storage_path/run_name)")
    sync.add_argument("--tracking-uri", help="the store to push to (default: the one in RUN_DIR/tracking.json)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ranray.tracking import SyncError, sync_run_dir

    if not Path(args.run_dir).is_dir():
        print(f"ranray track sync: {args.run_dir} is not a directory")
        return 2
    try:
        report = sync_run_dir(args.run_dir, args.tracking_uri)
    except SyncError as err:
        print(f"ranray track sync: {err}")
        return 1
    if not report.counts:
        print(f"{args.run_dir}: nothing kept locally, nothing to push")
        return 0
    print(f"pushed {report.line()}")
    return 0
