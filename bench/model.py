"""RAN forward+backward throughput: all K crops folded into one backbone call vs a Python loop over
the regions (how the reference RAN code runs), the pooled regions (model.region_features=pooled: one
backbone pass, each region read from the last feature map), and the whole-face network on the same
backbone, per backbone, input size, precision and memory format.

    python bench/model.py                      # CPU: iresnet50 + iresnet_tiny, fp32 + bf16, NCHW + NHWC
    python bench/model.py --gpu                # the same on CUDA, plus fp16
    python bench/model.py --backbones iresnet18 --precisions bf16 --formats contiguous --min-time 20
    python bench/model.py --backbones iresnet_tiny,iresnet_small --input-sizes 48,64,112 --precisions bf16 \
        --formats contiguous --batch 32          # jobs/ferplus_cpu.yaml's choice (docs/REAL_FACES.md)

The modes' steps alternate (folded, loop, pooled, whole face), so background load hits all alike. Each
cell runs in a child process: a kernel that crashes on this CPU (oneDNN's AVX-512 NHWC backward
does, see ranray/hardware.py) becomes a row saying so instead of ending the benchmark.
The table, with the CPU's flags, is printed and appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import report  # noqa: E402

from ranray.hardware import cpu_info  # noqa: E402
from ranray.config import ModelConfig  # noqa: E402
from ranray.models import RegionAttentionNetwork, region_biased_loss  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def folded_forward(net: RegionAttentionNetwork, images: torch.Tensor):
    out = net(images)
    return out.logits, out.mu


def loop_forward(net: RegionAttentionNetwork, images: torch.Tensor):
    """The reference code's shape: one backbone call per region, same crops and head."""
    crops = net.regions(images)
    feats = torch.stack([net.backbone(crops[:, k]) for k in range(crops.shape[1])], dim=1)
    mu, _, p = net.attend(feats)
    return net.classify(p), mu


def step(net, forward, images, labels, precision: str, device: torch.device) -> float:
    dtype = DTYPES[precision]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    net.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits, mu = forward(net, images)
    rb = region_biased_loss(mu, 0.1) if mu.shape[1] > 1 else 0.0  # the whole-face network has no RB loss
    loss = F.cross_entropy(logits, labels) + rb
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(backbone: str, precision: str, fmt: str, size: int, args, device: torch.device) -> dict:
    """Faces/s of RAN on crops folded and looped over regions, RAN on pooled regions, and the whole-face
    network (same backbone), and the timed rounds."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format

    def build(variant: str, features: str = "crops") -> RegionAttentionNetwork:
        cfg = ModelConfig(backbone=backbone, num_regions=args.regions, input_size=size, variant=variant,
                          region_features=features)
        return RegionAttentionNetwork(cfg).to(device).train().to(memory_format=memory_format)

    ran, pooled, whole = build("ran"), build("ran", "pooled"), build("whole_face")
    images = torch.randn(args.batch, 3, 112, 112, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 8, (args.batch,), device=device)
    modes = {"folded": (ran, folded_forward), "loop": (ran, loop_forward), "pooled": (pooled, folded_forward),
             "whole": (whole, folded_forward)}
    for _ in range(args.warmup):
        for net, fwd in modes.values():
            step(net, fwd, images, labels, precision, device)
    spent = {name: 0.0 for name in modes}
    rounds = 0
    start = time.perf_counter()
    while rounds < args.min_steps or (time.perf_counter() - start < args.min_time and rounds < args.max_steps):
        for name, (net, fwd) in modes.items():
            spent[name] += step(net, fwd, images, labels, precision, device)
        rounds += 1
    return {name: args.batch * rounds / s for name, s in spent.items()} | {"rounds": rounds}


def run_cell(backbone: str, precision: str, fmt: str, size: int, argv: list[str]) -> dict:
    """One cell in a child process: its figures, or how it died."""
    done = subprocess.run([sys.executable, __file__, *argv, "--cell", f"{backbone},{precision},{fmt},{size}"],
                          capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode < 0:
        return {"error": f"crashed ({signal.Signals(-done.returncode).name})"}
    return {"error": f"failed: {(done.stderr.strip().splitlines() or ['exit ' + str(done.returncode)])[-1]}"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="RAN forward+backward throughput: folded regions vs a loop over regions")
    p.add_argument("--gpu", action="store_true", help="run on CUDA (fp16 added to the precisions)")
    p.add_argument("--backbones", default="iresnet50,iresnet_tiny")
    p.add_argument("--precisions", default="", help="default: fp32,bf16 (CPU) or fp32,bf16,fp16 (GPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--regions", type=int, default=6)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds; default 1 on CPU, 3 on GPU")
    p.add_argument("--min-steps", type=int, default=2, help="timed rounds (one folded + one loop step each)")
    p.add_argument("--min-time", type=float, default=None,
                   help="keep timing rounds until this many seconds; default 8 on CPU, 3 on GPU")
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--formats", default="contiguous,channels_last", help="memory formats to compare")
    p.add_argument("--input-sizes", default="112", help="model.input_size values (every region at this side)")
    p.add_argument("--cell", default="", help=argparse.SUPPRESS)  # backbone,precision,format: one child's cell
    args = p.parse_args(argv)

    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu: CUDA is not available on this machine")
    device = torch.device("cuda" if args.gpu else "cpu")
    precisions = [s for s in (args.precisions or ("fp32,bf16,fp16" if args.gpu else "fp32,bf16")).split(",") if s]
    for prec in precisions:
        if prec not in DTYPES or (prec == "fp16" and not args.gpu):
            sys.exit(f"precision {prec!r} is not one of {list(DTYPES)} (fp16 needs --gpu)")
    args.warmup = (3 if args.gpu else 1) if args.warmup is None else args.warmup
    args.min_time = (3.0 if args.gpu else 8.0) if args.min_time is None else args.min_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        torch.backends.cudnn.benchmark = True

    if args.cell:
        backbone, prec, fmt, size = args.cell.split(",")
        print(json.dumps(measure(backbone, prec, fmt, int(size), args, device)))
        return

    load_before = os.getloadavg()[0]
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    cells = [(b, p, f, int(s)) for b in args.backbones.split(",") for s in args.input_sizes.split(",")
             for p in precisions for f in args.formats.split(",")]
    for backbone, prec, fmt, size in cells:
        r = run_cell(backbone, prec, fmt, size, child_argv)
        if "error" in r:
            rows.append([backbone, size, prec, fmt, args.batch, args.regions, r["error"], *"-" * 6, 0])
        else:
            rows.append([backbone, size, prec, fmt, args.batch, args.regions, round(r["folded"], 2),
                         round(r["loop"], 2), round(r["pooled"], 2), round(r["whole"], 2),
                         round(r["whole"] / max(r["folded"], r["loop"]), 2), round(r["whole"] / r["pooled"], 2),
                         r["rounds"]])
        print(" ".join(str(v) for v in rows[-1]), flush=True)

    where = f"GPU {torch.cuda.get_device_name(device)}" if args.gpu else f"CPU, {torch.get_num_threads()} torch threads"
    notes = (f"Forward+backward (CE + RB loss) of RegionAttentionNetwork in training mode, random 112x112 inputs, "
             f"fixed regions; {where}; folded = all B*K crops (each resampled to the input size) in one backbone "
             f"call, loop = one call per region, pooled = model.region_features=pooled (one backbone pass, each "
             f"region resampled from the last feature map, the backbone's head per region), whole face = the "
             f"same backbone on the face alone (model.variant whole_face); cost = time per face over the whole "
             f"face's (crops: the faster of folded and loop). "
             f"Steps alternate between the modes; each row times `rounds` steps of each after {args.warmup} "
             f"warm-up round(s). {cpu_info().describe()}.")
    notes += f" Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end."
    if not args.gpu:
        notes += (" The CPU is shared with other jobs, so absolute figures are noisy; the ratio is the more "
                  "stable number. Folding is meant for the GPU; on a CPU the loop may win (cache effects).")
    report(f"RAN forward+backward: crops (folded, loop) vs pooled regions vs whole face ({'GPU' if args.gpu else 'CPU'})",
           ["backbone", "input", "precision", "memory format", "batch", "K", "crops folded faces/s",
            "crops loop faces/s", "pooled faces/s", "whole face faces/s", "crops cost (x whole face)",
            "pooled cost (x whole face)", "rounds"],
           rows, notes)


if __name__ == "__main__":
    main()
