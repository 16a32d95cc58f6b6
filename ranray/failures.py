"""A dead worker in one line, its full story in its own log file.

Worker side, `worker_log(run_dir, rank)`: the worker process's stderr (file descriptor 2, where
Python warnings and tracebacks, faulthandler and Ray's native crash handler write) goes to
RUN_DIR/logs/rank<r>.log, appended with a header per start; ranray's own log lines also go to
stdout, which Ray streams to the driver. So a segfault leaves its native trace in that file and
not on the user's terminal.

Driver side, `explain(error, ...)`: Ray Train's WorkerGroupError (a page of actor metadata per
rank) becomes one line: which rank died, of which signal or cause, after how many retries, and
where its log is. `RunFailed` carries that line to the CLI, which prints it and exits 1.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from pathlib import Path

from ranray.run_dir import RunDir

_HEADER = "=== ranray worker {role} pid {pid} on {host} started {when}"
_SIGNAL = re.compile(r"\*\*\* (SIG[A-Z]+) received")
_FATAL = {"Segmentation fault": "SIGSEGV", "Aborted": "SIGABRT", "Bus error": "SIGBUS",
          "Floating-point exception": "SIGFPE", "Illegal instruction": "SIGILL"}


_DEATHS = ("ActorDiedError", "RayActorError", "ActorUnavailableError")


class RunFailed(RuntimeError):
    """A job's workers failed for good; the message is the one line the user gets."""


def worker_log(run_dir: Path, rank: int) -> Path:
    """Send this Ray Train worker's stderr to its rank's log (and ranray's log lines to stdout too).

    Never undone: a Ray Train worker process serves one worker group, and Ray's own report of the
    training function's error (written after it returns) belongs in the same file.
    """
    return redirect_stderr(RunDir(run_dir).worker_log(rank), f"rank {rank}")


def redirect_stderr(path: Path, role: str) -> Path:
    """Point file descriptor 2 of this (Ray worker) process at `path`, appending a start header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    with open(path, "ab", buffering=0) as f:
        header = _HEADER.format(role=role, pid=os.getpid(), host=socket.gethostname(), when=time.strftime("%F %T"))
        f.write((header + "\n").encode())
        os.dup2(f.fileno(), 2)
    log_to_stdout()
    return path


def log_to_stdout() -> None:
    """ranray's log lines (INFO and up) to stdout, once per process."""
    logger = logging.getLogger("ranray")
    if not any(getattr(h, "ranray_stdout", False) for h in logger.handlers):
        to_stdout = logging.StreamHandler(sys.stdout)
        to_stdout.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        to_stdout.ranray_stdout = True
        logger.addHandler(to_stdout)
    logger.setLevel(logging.INFO)


def crash_signal(log_file: Path, pid: int | None) -> str | None:
    """The fatal signal a worker's log records for process `pid` (its last start), if any."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return None
    if pid is not None:
        starts = [m.start() for m in re.finditer(rf"^=== ranray worker .* pid {pid} ", text, re.M)]
        if not starts:
            return None
        text = text[starts[-1]:]
    found = _SIGNAL.search(text)
    if found:
        return found.group(1)
    return next((sig for words, sig in _FATAL.items() if f"Fatal Python error: {words}" in text), None)


def _cause(error: BaseException) -> BaseException:
    return getattr(error, "health_check_failure", None) or error


def _pid_and_node(error: BaseException) -> tuple[int | None, str]:
    text = str(error)
    pid = re.search(r"\bpid[=:]\s*(\d+)", text)
    node = re.search(r"node_ip='([^']+)'|\bip: (\S+)", text)
    return (int(pid.group(1)) if pid else None), (next(g for g in node.groups() if g) if node else "?")


def describe_worker_failure(rank: int, error: BaseException, run_dir: Path) -> str:
    """'rank 1 (pid 3640 on 10.0.0.2) died of SIGSEGV' or 'rank 0 raised ValueError: ...'."""
    cause = _cause(error)
    pid, node = _pid_and_node(error)
    where = f"rank {rank} (pid {pid} on {node})" if pid else f"rank {rank}"
    if type(cause).__name__ not in _DEATHS:
        first = str(cause).strip().splitlines()
        return f"{where} raised {type(cause).__name__}: {first[-1] if first else ''}"
    text = str(cause)
    signal_name = crash_signal(RunDir(run_dir).worker_log(rank), pid)
    if signal_name:
        why = f"died of {signal_name}"
    elif "low on memory" in text:
        why = "was killed for running out of memory (Ray's memory monitor)"
    elif "its node has died" in text or "node died" in text:
        why = "was lost with its node"
    else:
        why = "died without a crash trace (SIGKILL, the kernel's OOM killer, or its node was lost)"
    return f"{where} {why}"


def explain(error: BaseException, *, job: str, run_dir: Path, max_failures: int) -> str:
    """One line for a failed Ray Train run: who died of what, after how many retries, which log."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        first = str(error).strip().splitlines()
        return f"{job} failed after {max_failures} retries: {first[0] if first else type(error).__name__}"
    # The dead rank, not a survivor whose collective then broke ("Connection closed by peer").
    died = [r for r, e in sorted(failures.items()) if type(_cause(e)).__name__ in _DEATHS]
    rank = died[0] if died else min(failures)
    what = describe_worker_failure(rank, failures[rank], run_dir)
    others = f" ({len(failures) - 1} other rank(s) failed with it)" if len(failures) > 1 else ""
    retries = f"{max_failures} retr{'y' if max_failures == 1 else 'ies'}"
    return (f"{job} failed: worker {what}{others}, after {retries} (checkpoint.max_failures); "
            f"its log: {RunDir(run_dir).worker_log(rank)}; the last good checkpoint is kept in {run_dir}")


# ---------------------------------------------------------------------------------------------
# The driver's terminal: Ray Train's controller prints every worker's failure as a page of actor
# metadata and tracebacks (two or three times per failure). Those pages are dropped from what the
# driver streams; the controller's own status lines ([FailurePolicy] RETRY/RAISE, the error count,
# group starts) and everything from the workers still print.
# ---------------------------------------------------------------------------------------------

_DUMP_START = ("Error: Training failed", "ray.train.WorkerGroupError", "ray.train.ControllerError",
               "Graceful shutdown of backend failed", "Traceback (most recent call last)")
_STATUS = ("[FailurePolicy]", "Source:", "Error count:", "Started training worker group", "- (ip=",
           "Requesting resources", "Attempting to start", "Retrying", "Restoring", "Training ")


class ControllerDumpFilter:
    """Per controller process: drop lines from a dump's start until the next status line."""

    def __init__(self):
        self.in_dump: set[object] = set()

    def keep(self, source: object, line: str) -> bool:
        text = line.strip()
        if text.startswith(_STATUS):
            self.in_dump.discard(source)
            return True
        if text.startswith(_DUMP_START):
            self.in_dump.add(source)
        return source not in self.in_dump

    def __call__(self, batch: dict) -> dict:
        if batch.get("actor_name") != "TrainController" and "TrainController" not in str(batch.get("task_name")):
            return batch
        lines = [line for line in batch.get("lines", []) if self.keep(batch.get("pid"), line)]
        return {**batch, "lines": lines}


def quiet_controller_dumps() -> None:
    """Filter the driver's stream of worker output (a Ray internal: skipped if it is not there)."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    handlers = getattr(dispatcher, "handlers", None)
    if not isinstance(handlers, list) or any(name == "ranray_quiet" for name, _ in handlers):
        return
    keep = ControllerDumpFilter()
    for i, (name, handler) in enumerate(list(handlers)):
        if name == "ray_print_logs":
            def filtered(data, _handler=handler):
                data = keep(data)
                if data.get("lines"):
                    _handler(data)
            handlers[i] = (name, filtered)
            handlers.append(("ranray_quiet", lambda data: None))
            return
