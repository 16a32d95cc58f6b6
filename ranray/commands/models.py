"""`ranray models`: the models shipped inside the package, with what they were trained on, their
test figures, how they were trained and what a photograph goes through before they see it."""

from __future__ import annotations

import argparse

HELP = "list the shipped models: data, accuracy (test, occlusion, pose), training, preprocessing"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="one shipped model (default: all)")


def run(args: argparse.Namespace) -> int:
    from ranray.data.schema import SUBSET_FLAGS
    from ranray.inference import load_trained_model
    from ranray.model_card import describe
    from ranray.pretrained import DEFAULT_MODEL, SHIPPED

    names = [args.name] if args.name else list(SHIPPED)
    unknown = [n for n in names if n not in SHIPPED]
    if unknown:
        print(f"ranray models: no shipped model {unknown[0]!r}; shipped: {', '.join(SHIPPED)}")
        return 2
    for name in names:
        shipped = SHIPPED[name]
        card, figures = shipped.card, shipped.figures
        trained = load_trained_model(name)
        print(f"{name}{' (default)' if name == DEFAULT_MODEL else ''}: {card['summary']}")
        rows = [("weights", f"{shipped.weights} ({shipped.weights.stat().st_size / 2**20:.1f} MB)"),
                ("trained on", f"{describe(trained.data)}, labels {trained.data.get('label_mode', '?')}"),
                ("protocol", card["protocol"]),
                ("test accuracy", _percent(figures, "test_accuracy") + f" of {figures['test_samples']:.0f} faces"),
                ("occlusion / pose>30 / pose>45", " / ".join(_percent(figures, f"test_acc_{s}")
                                                             for s in SUBSET_FLAGS)),
                ("training", f"{card['training']['seconds']} s: {card['training']['command']}"),
                *trained.preprocessing.rows()]
        for key, value in rows:
            print(f"  {key:<30}{value}")
    return 0


def _percent(figures: dict, key: str) -> str:
    return f"{100 * figures[key]:.2f}%" if key in figures else "n/a"
