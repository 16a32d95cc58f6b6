"""`ranray evaluate`: accuracy, per-class and subset accuracies and the confusion matrix of a
trained model on a prepared split, as a table, a JSON file and a PNG."""

from __future__ import annotations

import argparse

from ranray.data.schema import SUBSETS

HELP = "evaluate a trained RAN on a prepared split: table, JSON, confusion-matrix PNG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ranray.commands.predict import MODEL_HELP

    parser.add_argument("--model", "--checkpoint", dest="model", help=MODEL_HELP)
    parser.add_argument("--tracking-uri", help="the MLflow store of a models:/ URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument("--data", required=True, help="a prepared dataset (ranray prepare)")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--subset", default="all", choices=SUBSETS,
                        help="only rows with this flag")
    parser.add_argument("--out", help="output folder (default: eval_<split> beside the weights, "
                                      "./eval_<split> for a registered model)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader", choices=("torch", "dali"), default="torch")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--attention", type=int, default=0, metavar="N",
                        help="also draw N clean and N occluded faces with the attention of each region")


def run(args: argparse.Namespace) -> int:
    from ranray.data.schema import DatasetError
    from ranray.model_card import synthetic_warning
    from ranray.evaluation import evaluate

    try:
        report = evaluate(args.model, args.data, args.split, batch_size=args.batch_size, out_dir=args.out,
                          backend=args.loader, precision=args.precision, subset=args.subset,
                          tracking_uri=args.tracking_uri, attention_faces=args.attention)
    except (FileNotFoundError, DatasetError, ValueError) as err:
        print(f"ranray evaluate: {err}")
        return 2
    warning = synthetic_warning(report.trained_on)
    if warning:
        print(warning)
    print(report.table())
    for kind, path in report.files.items():
        print(f"{kind}: {path}")
    return 0
