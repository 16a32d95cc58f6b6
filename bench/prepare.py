"""`ranray prepare` throughput and driver memory.

  align      dlib faces/s: a plain loop (DlibFaces in this process, no Ray) vs `prepare` end to end
             with 1 worker and with one per CPU, on synthetic FERPlus (48x48, detector "given")
  scale      driver peak RSS and faces/s at 20k and 200k synthetic RecordIO rows (detector none):
             each prepare runs in a fresh driver process connected to this bench's Ray
  detectors  detector none vs dlib ("given") faces/s on the same aligned 112x112 RecordIO faces

    .venv/bin/python bench/prepare.py [--parts align,scale,detectors] [--n 5000]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from _results import report  # noqa: E402

from ranray.data.prepare import align_options, prepare  # noqa: E402
from ranray.data.prepare_worker import DlibFaces  # noqa: E402
from ranray.data.sources import READERS  # noqa: E402
from ranray.data.sources.recordio import write_sorted_recordio  # noqa: E402
from ranray.data.synth import SynthOptions, synthesize  # noqa: E402

# A driver in a fresh process: its own peak RSS is what `ranray prepare` costs the machine it runs on.
# VmHWM, not getrusage's ru_maxrss: that one keeps the parent's peak across fork + exec.
DRIVER = """
import json, sys
from pathlib import Path
from ranray.config import PrepareConfig, load_config
from ranray.data.prepare import prepare
s = prepare(load_config(PrepareConfig, None, sys.argv[1:]))
hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"rss_mib": int(hwm.split()[1]) / 1024, "seconds": s.seconds,
                  "written": s.rows_written, "rejected": s.rows_rejected}))
"""


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def small_faces(count: int) -> list[bytes]:
    """Smooth 112x112 JPEGs (about 1 KB each): aligned-face sized, cheap to store by the 100k."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 112, dtype=np.float32)
    faces = []
    for _ in range(count):
        base = rng.integers(40, 215, 3).astype(np.float32)
        pixels = base + 40 * ramp[:, None, None] * rng.uniform(-1, 1, 3) + 40 * ramp[None, :, None] * rng.uniform(-1, 1, 3)
        faces.append(_jpeg(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")))
    return faces


def rendered_faces(tmp: Path, count: int) -> list[bytes]:
    """Synthetic faces rendered and resized to 112x112: what dlib needs to do real work."""
    raw = synthesize(tmp / "faces", SynthOptions(n=count, seed=1, format="identity", per_identity=4, pairs=0))
    return [_jpeg(Image.open(p).convert("RGB").resize((112, 112))) for p in sorted(raw.root.glob("*/*/*.png"))]


def recordio(tmp: Path, name: str, rows: int, faces: list[bytes], per_identity: int = 50) -> Path:
    counts = [per_identity] * (rows // per_identity) + ([rows % per_identity] if rows % per_identity else [])
    (tmp / name).mkdir()
    rec, _ = write_sorted_recordio(tmp / name / "train", counts, lambda i, j: faces[(i * 7 + j) % len(faces)])
    return rec


def child_prepare(overrides: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", DRIVER, *overrides], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------


def part_align(tmp: Path, n: int, cpus: int) -> None:
    raw = synthesize(tmp / "fer", SynthOptions(n=n, seed=0, non_face_frac=0.0))
    cfg = raw.prepare_config(tmp / "unused")
    rows = [vars(r) for r in READERS[cfg.source](cfg).rows if not r.reason]
    faces = DlibFaces(align_options(cfg), cfg.jpeg_quality)  # loading not timed
    start = time.perf_counter()
    written = 0
    for row in rows:
        try:
            faces.face(row)
            written += 1
        except Exception:  # noqa: BLE001 - a reject counts as no face, as in prepare
            pass
    plain = written / (time.perf_counter() - start)
    table = [["plain loop (1 process, no Ray)", 1, written, round(written / plain, 1), round(plain, 1)]]
    table[0].append(round(plain, 1))
    rates, steady = {}, {}
    for workers in sorted({1, cpus}):
        marks: list[tuple[float, int]] = []  # (time, input rows done) at each progress line
        s = prepare(dataclasses.replace(cfg, out=str(tmp / f"align{workers}"), num_workers=workers, progress_every=4),
                    progress=lambda line: marks.append((time.perf_counter(), int(line.split(" blocks, ")[1].split("/")[0]))))
        rates[workers] = s.rows_written / s.seconds
        # Steady state: from the first progress line (the actors are up, dlib loaded) to the last.
        (t0, r0), (t1, r1) = marks[0], marks[-1]
        steady[workers] = (r1 - r0) / (t1 - t0) if t1 > t0 else float("nan")
        table.append([f"prepare, {workers} worker(s)", workers, s.rows_written, s.seconds, round(rates[workers], 1),
                      round(steady[workers], 1)])
    scaling = rates[cpus] / rates[1] / cpus if cpus > 1 else 1.0
    steady_scaling = steady[cpus] / steady[1] / cpus if cpus > 1 else 1.0
    report("prepare: dlib faces/s (workers read, align and write their own blocks; 48x48 synthetic FERPlus)",
           ["run", "workers", "faces", "seconds", "faces/s end to end", "rows/s steady state"], table,
           notes=f"Scaling {cpus} workers vs 1 (fraction of linear): {scaling:.2f} end to end (start-up, planning "
                 f"and the manifest included), {steady_scaling:.2f} steady state; prepare x{cpus} vs the plain loop: "
                 f"{rates[cpus] / plain:.2f}x end to end, {steady[cpus] / plain:.2f}x steady. "
                 f"Load average after the runs: {load()} on {cpus} CPUs.")


def part_scale(tmp: Path, sizes: list[int], cpus: int, env: dict[str, str]) -> None:
    faces = small_faces(64)
    table, rss = [], []
    for rows in sizes:
        rec = recordio(tmp, f"rec{rows}", rows, faces)
        result = child_prepare(["source=recordio", f"inputs=[\"{rec}\"]", f"out=\"{tmp / f'out{rows}'}\"",
                                "detector=none", f"num_workers={cpus}"], env)
        rss.append(result["rss_mib"])
        table.append([rows, result["written"], result["seconds"], round(result["written"] / result["seconds"], 1),
                      round(result["rss_mib"], 1), load()])
    report("prepare: driver peak RSS vs rows (synthetic RecordIO, 112x112 JPEG ~1 KB, detector none)",
           ["rows", "written", "seconds", "faces/s", "driver peak RSS MiB", "load average"], table,
           notes=f"Driver peak RSS at {sizes[-1]} rows / at {sizes[0]} rows: {rss[-1] / rss[0]:.2f} "
                 f"({sizes[-1] // sizes[0]}x the rows). Each driver is a fresh process connected to one Ray "
                 f"instance of {cpus} CPUs; it plans byte ranges of the .idx and receives only per-block statistics.")


def part_detectors(tmp: Path, rows: int, cpus: int) -> None:
    rec = recordio(tmp, "aligned", rows, rendered_faces(tmp, 200))
    table = []
    for detector in ("none", "given"):
        from ranray.config import PrepareConfig

        cfg = PrepareConfig(source="recordio", inputs=[str(rec)], out=str(tmp / f"det-{detector}"), detector=detector,
                            num_workers=cpus)
        s = prepare(cfg)
        table.append([detector, cpus, s.rows_written, s.rows_rejected, s.seconds, round(s.rows_written / s.seconds, 1),
                      load()])
    ratio = table[0][5] / table[1][5]
    report("prepare: detector none vs dlib on the same aligned RecordIO (112x112 rendered synthetic faces)",
           ["detector", "workers", "written", "rejected", "seconds", "faces/s", "load average"], table,
           notes=f"detector none is {ratio:.1f}x dlib ('given': 68-point fit + warp + JPEG) end to end.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="align,scale,detectors")
    parser.add_argument("--n", type=int, default=5000, help="faces for the align part")
    parser.add_argument("--sizes", default="20000,200000", help="RecordIO rows for the scale part")
    parser.add_argument("--detector-rows", type=int, default=2000)
    args = parser.parse_args()
    parts = args.parts.split(",")
    cpus = os.cpu_count() or 1

    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "align" in parts:
                part_align(Path(tmp), args.n, cpus)
            if "scale" in parts:
                part_scale(Path(tmp), [int(s) for s in args.sizes.split(",")], cpus, env)
            if "detectors" in parts:
                part_detectors(Path(tmp), args.detector_rows, cpus)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
