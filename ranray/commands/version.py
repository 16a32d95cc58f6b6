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
    from ranray.pretrained import DEFAULT_MODEL, SHIPPED

    for key, value in describe():
        print(f"  {key}: {value}")
    figures = SHIPPED[DEFAULT_MODEL].figures
    print(f"  shipped model: {DEFAULT_MODEL}, FERPlus test {100 * figures['test_accuracy']:.2f}%, "
          f"Occlusion-FERPlus {100 * figures['test_acc_occlusion']:.2f}%, Pose > 30 "
          f"{100 * figures['test_acc_pose30']:.2f}%, Pose > 45 {100 * figures['test_acc_pose45']:.2f}% "
          "(ranray models)")
    return 0
