from __future__ import annotations

import argparse

HELP = "print the ranray version, its main dependencies and the CPU/GPU features that decide the defaults"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short", action="store_true", help="print only ranray's version")


def run(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    import ranray

    print(f"ranray {ranray.__version__}")
    if args.short:
        return 0
    for dist in ("torch", "ray", "nvidia-dali-cuda130", "dlib-bin", "mlflow", "pyarrow", "numpy"):
        try:
            print(f"  {dist} {version(dist)}")
        except PackageNotFoundError:
            print(f"  {dist} (not installed)")
    from ranray.hardware import describe

    for key, value in describe():
        print(f"  {key}: {value}")
    return 0
