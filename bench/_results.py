"""Shared by every benchmark: print a table and append it to bench/RESULTS.md with machine and date."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path
from typing import Sequence

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}){gpu}, Python {platform.python_version()}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], notes: str = "") -> str:
    """Print the table and append it, with the machine and date, to bench/RESULTS.md."""
    table = markdown_table(headers, rows)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = f"\n## {title}\n{stamp} - {machine()}\n\n{table}\n"
    if notes:
        section += f"\n{notes}\n"
    print(section)
    with RESULTS.open("a") as f:
        f.write(section)
    return table
