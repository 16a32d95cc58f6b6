"""Prediction latency per face on the CPU: torch against onnxruntime on the same exported graph
(ranray.export), batch 1, at 1 thread and at every core, for the shipped model and an iresnet50 RAN.

    python bench/onnx_latency.py                      # shipped model + iresnet50 (K=6, 112 px), 1 and all threads
    python bench/onnx_latency.py --models iresnet50 --threads 1 --min-time 10

The iresnet50 RAN has random weights (BN in eval with its initial statistics): latency does not depend
on the weights. The input is one normalised aligned face of noise; torch runs the network itself
(what `ranray predict` runs, under no_grad), onnxruntime the graph export_onnx writes. The runtimes
alternate call by call, so background load hits both alike; each cell reports the median of its calls.
The table, with the CPU's flags and the load average, is printed and appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import report  # noqa: E402

from ranray.config import ModelConfig  # noqa: E402
from ranray.data.schema import FACE_SIZE  # noqa: E402
from ranray.export import OUTPUTS, ExportedRAN, export_graph, exported  # noqa: E402
from ranray.hardware import cpu_info  # noqa: E402
from ranray.models import build_ran  # noqa: E402
from ranray.inference import load_trained_model  # noqa: E402


def shipped() -> ExportedRAN:
    return exported(load_trained_model())  # the shipped model (ranray.pretrained)


def iresnet50() -> ExportedRAN:
    torch.manual_seed(0)
    return ExportedRAN(build_ran(ModelConfig(backbone="iresnet50", input_size=112, num_regions=6)), grey=False).eval()


MODELS = {"shipped": shipped, "iresnet50": iresnet50}


def measure(wrapper: ExportedRAN, graph: Path, threads: int, min_time: float, min_calls: int) -> tuple[float, float]:
    """Median ms per call of torch and of onnxruntime, batch 1, the two alternating."""
    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, FACE_SIZE, FACE_SIZE) * 2 - 1
    feed = {"images": x.numpy()}

    def torch_call() -> None:
        with torch.no_grad():
            wrapper(x)

    def ort_call() -> None:
        session.run(list(OUTPUTS), feed)

    for _ in range(2):  # warm-up: allocations, oneDNN primitive caches
        torch_call()
        ort_call()
    times: dict[str, list[float]] = {"torch": [], "ort": []}
    start = time.perf_counter()
    while len(times["ort"]) < min_calls or time.perf_counter() - start < min_time:
        for name, call in (("torch", torch_call), ("ort", ort_call)):
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return tuple(1000 * statistics.median(times[k]) for k in ("torch", "ort"))  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts")
    ap.add_argument("--min-time", type=float, default=5.0, help="seconds per cell, at least")
    ap.add_argument("--min-calls", type=int, default=5, help="calls per runtime per cell, at least")
    args = ap.parse_args()
    threads = sorted({int(t) for t in args.threads.split(",")})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            wrapper = MODELS[name]()
            graph = Path(tmp) / f"{name}.onnx"
            export_graph(wrapper, graph, (torch.zeros(2, 3, FACE_SIZE, FACE_SIZE),), ["images"])
            cfg = wrapper.net.cfg
            for t in threads:
                torch_ms, ort_ms = measure(wrapper, graph, t, args.min_time, args.min_calls)
                rows.append((name, cfg.backbone, cfg.input_size, cfg.num_regions, cfg.region_features, t,
                             round(torch_ms, 1), round(ort_ms, 1), round(torch_ms / ort_ms, 2)))
                print(rows[-1], flush=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    report("ONNX export: predict latency per face, torch vs onnxruntime (bench/onnx_latency.py)",
           ["model", "backbone", "region px", "K", "region features", "threads", "torch ms", "onnxruntime ms",
            "torch / ort"], rows,
           notes=f"batch 1, fp32, one aligned {FACE_SIZE}x{FACE_SIZE} face, network only (no detection or "
                 f"alignment); median of alternating calls over >= {args.min_time:g} s and >= {args.min_calls} "
                 f"calls per cell; onnxruntime {ort.__version__} (CPUExecutionProvider, intra-op threads as "
                 f"given, inter-op 1), torch {torch.__version__}; the iresnet50 RAN has random weights (latency "
                 f"does not depend on them); the shipped model is ranray.pretrained's default. {cpu_info().describe()}; "
                 f"load average (1, 5, 15 min) at the table {load}.")


if __name__ == "__main__":
    main()
