"""Video frames/s end to end (decode + detect + align/classify, ranray.video.predict_video) on a CPU, and
where the time goes, on a 640x480 H.264 clip this writes from scikit-image's photographs: the
astronaut (one smiling face; dlib's HOG also fires now and then on her suit's patch, which the
faces column counts) sliding across the coffee photograph for 3/4 of the clip, the coffee alone
(no face) for the rest.

    python bench/video.py                                   # shipped model, 4 s at 10 fps, every 1 and 5
    python bench/video.py --seconds 10 --fps 25 --every 1,3,10 --threads 1

Each row is the fastest of --repeats runs, after a warm-up. A decode-only row gives PyAV's rate to RGB arrays alone. The table is printed and appended to
bench/RESULTS.md with the machine, CPU flags and load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import report  # noqa: E402

from ranray.hardware import cpu_info  # noqa: E402
from ranray.inference import load_trained_model  # noqa: E402
from ranray.video import open_video, predict_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
W, H = 640, 480


def clip_frames(n: int) -> list[np.ndarray]:
    background = np.asarray(Image.fromarray(data.coffee()).resize((W, H)))
    astronaut = data.astronaut()[:H, 40:40 + 400]  # the face and shoulders, 400x480
    frames = []
    for i in range(n):
        frame = background.copy()
        if i < n * 3 // 4:
            x = (6 * i) % (W - astronaut.shape[1])
            frame[:, x:x + astronaut.shape[1]] = astronaut
        frames.append(frame)
    return frames


def write_clip(path: Path, n: int, fps: int) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for f in clip_frames(n):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return path


def decode_only(path: Path) -> tuple[int, float]:
    t = time.perf_counter()
    with open_video(path) as container:
        n = sum(1 for f in container.decode(container.streams.video[0]) if f.to_ndarray(format="rgb24") is not None)
    return n, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model file, run or shipped model name (default: the shipped model)")
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--fps", type=int, default=10)
    ap.add_argument("--every", default="1,5", help="comma-separated --every values, one row each")
    ap.add_argument("--annotate", action="store_true", help="also write the annotated video (every=1 row)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per row, the fastest reported (load on a shared box)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    trained = load_trained_model(args.model)
    n = round(args.seconds * args.fps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / "clip.mp4", n, args.fps)
        predict_video(trained, clip, Path(tmp) / "out.csv", every=n)  # warm-up: dlib's models, torch's kernels
        frames, secs = min((decode_only(clip) for _ in range(args.repeats)), key=lambda fs: fs[1])
        rows.append(["decode only", frames, "-", "-", round(frames / secs, 1), "-", round(1e3 * secs / frames, 2),
                     "-", "-", "-"])
        runs = [(int(e), False) for e in args.every.split(",")] + ([(1, True)] if args.annotate else [])
        for every, annotate in runs:
            r = min((predict_video(trained, clip, Path(tmp) / "out.csv", every=every,
                                   annotated=Path(tmp) / "out.mp4" if annotate else None)
                     for _ in range(args.repeats)), key=lambda rep: rep.seconds)
            s = r.stage_seconds
            rows.append([f"every {every}" + (" + annotated" if annotate else ""), r.frames_read, r.frames_processed,
                         r.faces, round(r.frames_per_s, 2), round(r.frames_processed / r.seconds, 2),
                         round(1e3 * s["decode"] / r.frames_read, 2), round(1e3 * s["detect"] / r.frames_processed),
                         round(1e3 * s["classify"] / max(r.faces, 1)),
                         round(1e3 * s["annotate"] / r.frames_read, 1) if annotate else "-"])
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    report("Video frames/s end to end on CPU (bench/video.py)",
           ["run", "frames read", "processed", "faces", "frames/s end to end", "processed frames/s",
            "decode ms/frame", "detect ms/processed frame", "align+classify ms/face", "annotate ms/frame"], rows,
           f"{W}x{H} H.264 clip written from skimage's astronaut on coffee ({n} frames at {args.fps} fps, a face in "
           f"3/4 of them), PyAV {av.__version__}, dlib HOG detector (upsampled once: frames < 800 px), model "
           f"{trained.source}, torch "
           f"threads {torch.get_num_threads()}, fastest of {args.repeats} runs a row; load average at the end {load}. {cpu_info().describe()}.")


if __name__ == "__main__":
    main()
