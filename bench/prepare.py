"""`ranray prepare` throughput and driver memory.

  align      dlib faces/s: a plain loop (DlibFaces in this process, no Ray) vs `prepare` end to end
             with 1 worker and with one per CPU, on synthetic FERPlus (48x48, detector "given")
  scale      driver peak RSS and faces/s at 20k and 200k synthetic RecordIO rows (detector none):
             each prepare runs in a fresh driver process connected to this bench's Ray
  detectors  detector none vs dlib ("given") faces/s on the same aligned 112x112 RecordIO faces
  nodes      `ray job submit` of prepare to the local multi-node cluster (cluster/local.sh): 1 vs 3
             worker nodes, and one node with 2 CPUs vs 2 nodes with 1 (not in the default parts)
  real       the real FERPlus (--ferplus DIR: FER2013Train/Valid/Test with label.csv) with RAN's lists
             (--lists DIR: FERplus_dir/), one worker per CPU, each template: rows, rejects, fallbacks,
             list matches and faces/s (not in the default parts; docs/REAL_FACES.md)

    .venv/bin/python bench/prepare.py [--parts align,scale,detectors,nodes] [--n 5000]
    .venv/bin/python bench/prepare.py --parts real --ferplus data/raw/ferplus --lists FERplus_dir
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# RecordIO inputs are written with the tests' writer (ranray itself only reads the format).
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from _results import report  # noqa: E402
from recordio_writers import write_sorted_recordio  # noqa: E402

from ranray.config import PrepareConfig  # noqa: E402
from ranray.data.prepare import align_options, prepare  # noqa: E402
from ranray.data.prepare_worker import DlibFaces  # noqa: E402
from ranray.data.sources import PLANNERS  # noqa: E402
from ranray.data.sources.common import SPLIT_NAMES  # noqa: E402
from ranray.data.sources.lines import plan_rows  # noqa: E402
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


def _plain_rate(faces: DlibFaces, rows: list[dict]) -> tuple[int, float]:
    start = time.perf_counter()
    written = 0
    for row in rows:
        try:
            faces.face(row)
            written += 1
        except Exception:  # noqa: BLE001 - a reject counts as no face, as in prepare
            pass
    return written, written / (time.perf_counter() - start)


def _prepare_rates(cfg, out: Path, workers: int) -> tuple[int, float, float, float]:
    """(written, seconds, faces/s end to end, rows/s steady): steady runs from the first progress
    line (actors up, dlib loaded) to the last but one (the tail, where workers run out of blocks)."""
    marks: list[tuple[float, int]] = []
    s = prepare(dataclasses.replace(cfg, out=str(out), num_workers=workers, progress_every=4),
                progress=lambda line: marks.append((time.perf_counter(), int(line.split(" blocks, ")[1].split("/")[0]))))
    (t0, r0), (t1, r1) = marks[0], marks[max(1, len(marks) - 2)]
    return s.rows_written, s.seconds, s.rows_written / s.seconds, (r1 - r0) / (t1 - t0) if t1 > t0 else float("nan")


def part_align(tmp: Path, n: int, cpus: int, repeats: int) -> None:
    """Each configuration `repeats` times, interleaved (this machine's speed drifts by 10-20% from one
    minute to the next); the table gives the median of each."""
    raw = synthesize(tmp / "fer", SynthOptions(n=n, seed=0, non_face_frac=0.0))
    cfg = raw.prepare_config(tmp / "unused")
    rows = [vars(r) for r in plan_rows(PLANNERS[cfg.source](cfg, tmp)) if not r.reason]
    faces = DlibFaces(align_options(cfg), cfg.jpeg_quality)  # loading not timed
    counts = sorted({1, cpus})
    plain: list[float] = []
    runs: dict[int, list[tuple[int, float, float, float]]] = {w: [] for w in counts}
    for rep in range(repeats):
        written, rate = _plain_rate(faces, rows)
        plain.append(rate)
        for workers in counts:
            runs[workers].append(_prepare_rates(cfg, tmp / f"align{workers}-{rep}", workers))
    med = statistics.median
    table = [["plain loop (1 process, no Ray)", 1, written, round(written / med(plain), 1), round(med(plain), 1),
              round(med(plain), 1), spread(plain)]]
    e2e = {w: med(r[2] for r in runs[w]) for w in counts}
    steady = {w: med(r[3] for r in runs[w]) for w in counts}
    for w in counts:
        table.append([f"prepare, {w} worker(s)", w, runs[w][0][0], round(med(r[1] for r in runs[w]), 1),
                      round(e2e[w], 1), round(steady[w], 1), spread([r[2] for r in runs[w]])])
    scaling = e2e[cpus] / e2e[1] / cpus if cpus > 1 else 1.0
    steady_scaling = steady[cpus] / steady[1] / cpus if cpus > 1 else 1.0
    report("prepare: dlib faces/s (workers read, align and write their own blocks; 48x48 synthetic FERPlus)",
           ["run", "workers", "faces", "seconds", "faces/s end to end", "rows/s steady state",
            f"end-to-end min-max of {repeats}"], table,
           notes=f"Medians of {repeats} interleaved repeats on a Ray started before the first (no run pays its "
                 f"start-up). Scaling {cpus} workers vs 1 (fraction of linear): {scaling:.2f} end to end "
                 f"(actor start-up, dlib load, planning and the manifest included), {steady_scaling:.2f} steady "
                 f"state; prepare x{cpus} vs the plain loop: {e2e[cpus] / med(plain):.2f}x end to end, "
                 f"{steady[cpus] / med(plain):.2f}x steady. Load average after the runs: {load()} on {cpus} CPUs.")


def spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def part_nodes(tmp: Path, n: int, layouts: list[tuple[int, int]]) -> None:
    """`ranray prepare` submitted with `ray job submit` to the local multi-node cluster (cluster/local.sh),
    one fresh cluster per layout (worker nodes x CPUs per node; the head has no CPUs)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from cluster_utils import LocalCluster

    raw = synthesize(tmp / "fer-nodes", SynthOptions(n=n, seed=0, non_face_frac=0.0))
    table = []
    for nodes, cpus in layouts:
        out = tmp / f"nodes{nodes}x{cpus}"
        entry = [sys.executable, "-m", "ranray.cli", "prepare", "ferplus", str(raw.root), "--out", str(out),
                 f"num_workers={nodes * cpus}"]
        with LocalCluster.up(workers=nodes, cpus_per_worker=cpus) as cluster:
            sid = cluster.submit(entry)
            info = cluster.wait_job(sid, timeout=1800)
            if info["status"] != "SUCCEEDED":
                raise RuntimeError(cluster.job_logs(sid)[-3000:])
        manifest = json.loads((out / "manifest.json").read_text())
        job_s = (info["end_time"] - info["start_time"]) / 1000
        written = manifest["rows_written"]
        table.append([nodes, cpus, nodes * cpus, written, round(job_s, 1), manifest["seconds"],
                      round(written / job_s, 1), round(written / manifest["seconds"], 1), load()])
    base = table[0][6]
    for row in table:
        row.insert(7, round(row[6] / base, 2))
    report("prepare on the local multi-node cluster: worker nodes vs faces/s (ray job submit, dlib, 48x48 FERPlus)",
           ["worker nodes", "CPUs per node", "align actors", "faces", "job s (submit to end)", "prepare s",
            "faces/s (job)", f"vs {table[0][0]}x{table[0][1]}", "faces/s (prepare)", "load average"], table,
           notes=f"Every node of cluster/local.sh is its own raylet, object store and workers (own network "
                 f"namespace where the machine allows it), but all of them share this machine's "
                 f"{os.cpu_count()} cores: more nodes than cores cannot add throughput here, so a row with more "
                 f"actors than cores shows what the extra nodes cost, not how a real cluster scales. Equal-core "
                 f"rows (one node with all CPUs vs one CPU per node) isolate the cost of crossing nodes.")


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


RAN_LISTS = {"occlusion": "jianfei_occlusion_list.txt", "pose30": "pose_30_ferplus_list.txt",
             "pose45": "pose_45_ferplus_list.txt"}


def part_real(tmp: Path, ferplus: Path, lists: Path | None, cpus: int, templates: list[str]) -> None:
    """`ranray prepare ferplus` on the real folders, as a user runs it: every row accounted for."""
    subset_lists = {k: str(lists / name) for k, name in RAN_LISTS.items()} if lists else {}
    table = []
    for template in templates:
        out = tmp / f"ferplus_{template}"
        s = prepare(PrepareConfig(source="ferplus", inputs=[str(ferplus)], out=str(out), align_template=template,
                                  subset_lists=subset_lists, num_workers=cpus))
        matched = json.loads((out / "manifest.json").read_text())["subset_lists"]
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(s.rejects_by_reason.items(), key=lambda kv: -kv[1]))
        table.append([template, s.rows_in, s.rows_written, " / ".join(str(s.split_rows.get(k, 0)) for k in SPLIT_NAMES),
                      f"{s.rows_rejected} ({reasons})", s.align_fallback,
                      " / ".join(f"{m['matched']} of {m['listed']}" for m in matched.values()) or "-",
                      round(s.seconds, 1), round(s.rows_written / s.seconds, 1)])
    report("prepare: the real FERPlus, end to end (ranray prepare ferplus, dlib, 48x48 crops)",
           ["align template", "rows in", "written", " / ".join(SPLIT_NAMES), "rejected", "box fallbacks",
            f"lists matched ({'/'.join(RAN_LISTS)})", "seconds", "faces/s"], table,
           notes=f"{ferplus} with RAN's lists from {lists or '(none)'}; {cpus} workers on a Ray started before the "
                 f"first run (no run pays its start-up); detector given (the crops are faces). "
                 f"Load average after the runs: {load()} on {cpus} CPUs.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="align,scale,detectors")
    parser.add_argument("--n", type=int, default=5000, help="faces for the align part")
    parser.add_argument("--sizes", default="20000,200000", help="RecordIO rows for the scale part")
    parser.add_argument("--detector-rows", type=int, default=2000)
    parser.add_argument("--layouts", default="1x1,3x1,1x2,2x1",
                        help="nodes part: worker nodes x CPUs per node, one cluster each")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the align part")
    parser.add_argument("--ferplus", help="real part: the folder holding FER2013Train/, FER2013Valid/, FER2013Test/")
    parser.add_argument("--lists", help="real part: RAN's FERplus_dir/ with the occlusion and pose lists")
    parser.add_argument("--templates", default="fer2013,insightface", help="real part: align templates to run")
    args = parser.parse_args()
    parts = args.parts.split(",")
    cpus = os.cpu_count() or 1
    if "real" in parts and not args.ferplus:
        parser.error("--parts real needs --ferplus DIR (the real FER2013Train/Valid/Test folders)")
    if "nodes" in parts:  # before this bench's own Ray starts: the cluster gets the machine to itself
        with tempfile.TemporaryDirectory() as tmp:
            part_nodes(Path(tmp), args.n, [tuple(map(int, lay.split("x"))) for lay in args.layouts.split(",")])
        parts.remove("nodes")
    if not parts:
        return

    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "align" in parts:
                part_align(Path(tmp), args.n, cpus, args.repeats)
            if "scale" in parts:
                part_scale(Path(tmp), [int(s) for s in args.sizes.split(",")], cpus, env)
            if "detectors" in parts:
                part_detectors(Path(tmp), args.detector_rows, cpus)
            if "real" in parts:
                part_real(Path(tmp), Path(args.ferplus), Path(args.lists) if args.lists else None, cpus,
                          args.templates.split(","))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
