from __future__ import annotations

import argparse

HELP = "put fine-tuning runs side by side (accuracy overall, per subset, per class; protocol, model variant)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (storage_path/run_name)")
    parser.add_argument("--out", default="runs/compare",
                        help="where compare.md goes (and the comparison's MLflow fallback log); default runs/compare")
    parser.add_argument("--no-mlflow", action="store_true", help="print the table only, log no MLflow run")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ranray.compare import log_comparison, markdown_table, read_run

    runs = [read_run(r) for r in args.runs]
    table = markdown_table(runs)
    print(table, end="")
    out = Path(args.out)
    if args.no_mlflow:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(table)
    else:
        run_id = log_comparison(runs, table, out)
        print(f"\nlogged to MLflow run {run_id} ({runs[0].tracking_uri}, experiment {runs[0].experiment})")
    print(f"table: {out / 'compare.md'}")
    return 0
