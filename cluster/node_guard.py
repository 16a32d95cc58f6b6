"""Run one local Ray node (`ray start --block ...`) as exactly one pid's process tree.

The node's whole process tree can then be found and ended by that pid, and only that tree.

A session or process group does not hold a Ray node (the job driver and its watcher start new
sessions), and its processes are orphaned when their parent dies (workers, when their raylet is
killed). This guard marks itself a child subreaper
(prctl PR_SET_CHILD_SUBREAPER), so every such orphan is re-parented to it instead of to init: the
node is then exactly "this pid and its descendants", which cluster/local.sh and
tests/cluster_utils.py rely on to stop one node without touching other Ray instances on the
machine (never `ray stop`, which ends every Ray process of the user).

When the node's main process exits (for instance after its raylet was SIGKILLed) the guard
SIGKILLs what is left of the tree, like a host that went down, and exits. On SIGTERM it asks the
node to stop (SIGTERM to `ray start --block`, which shuts its processes down), waits a grace
period, then SIGKILLs the rest.

Usage: python cluster/node_guard.py [--grace S] [--state DIR] [--start-nice N] -- ray start --block ...
       python cluster/node_guard.py --kill-tree PID
       python cluster/node_guard.py --renice-tree PID
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of `root`, read from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields after the last ')' are fixed.
        fields = stat[stat.rindex(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def set_start_priority(niceness: int) -> None:
    """Run this node at `niceness` while it starts; its processes inherit it.

    Where the kernel groups processes by session for scheduling (autogroup), the node's session
    competes with every other session as one unit and a process's own niceness only ranks it
    within its session: the session's niceness is what counts there."""
    os.setpriority(os.PRIO_PROCESS, 0, niceness)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(niceness))
    except OSError:
        pass  # no autogroup scheduling here: the process niceness above is what counts


def renice_tree(root: int, niceness: int) -> None:
    """Set the niceness of `root`'s session (autogroup) and of every thread of `root` and its
    descendants (Linux keeps it per thread; processes forked during the sweep are caught by the
    second pass)."""
    try:
        with open(f"/proc/{root}/autogroup", "w") as f:
            f.write(str(niceness))
    except OSError:
        pass
    for _ in range(2):
        for pid in [root] + descendants(root):
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)
                except OSError:
                    pass  # the thread ended meanwhile


def reap(block: bool) -> tuple[int, int] | None:
    """Reap one child; None when there is nothing (left) to reap."""
    try:
        pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return None
    if pid == 0:
        return None
    return pid, status


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, default=15.0,
                        help="seconds the node gets to stop on SIGTERM before the tree is SIGKILLed")
    parser.add_argument("--state", default="",
                        help="the local cluster's state dir; it only marks whose node this is")
    parser.add_argument("--kill-tree", type=int, default=0, metavar="PID",
                        help="instead of running a node: SIGKILL PID and all its descendants")
    parser.add_argument("--start-nice", type=int, default=0, metavar="N",
                        help="run the node at niceness N (negative: root only) until "
                             "`--renice-tree` puts it back to 0")
    parser.add_argument("--renice-tree", type=int, default=0, metavar="PID",
                        help="instead of running a node: put PID and all its descendants back to "
                             "niceness 0")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.renice_tree:
        renice_tree(args.renice_tree, 0)
        return 0
    if args.kill_tree:
        # Children first in the list are found while their parents still hold them.
        kill_all(descendants(args.kill_tree) + [args.kill_tree])
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    if args.start_nice:
        set_start_priority(args.start_nice)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")

    stop_requested = False

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    main_proc = subprocess.Popen(command)
    main_status: int | None = None
    deadline: float | None = None

    while True:
        if stop_requested and deadline is None:
            deadline = time.monotonic() + args.grace
            if main_status is None:
                os.kill(main_proc.pid, signal.SIGTERM)
        got = reap(block=False)
        if got is not None:
            pid, status = got
            if pid == main_proc.pid:
                main_status = os.waitstatus_to_exitcode(status)
            continue
        if main_status is not None or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(0.2)

    # The node's main process is gone (or out of time): nothing of this node may outlive it.
    for _ in range(50):
        left = descendants(os.getpid())
        if not left:
            break
        kill_all(left)
        while reap(block=False) is not None:
            pass
        time.sleep(0.1)
    while True:
        got = reap(block=False)
        if got is None:
            break
        if got[0] == main_proc.pid:
            main_status = os.waitstatus_to_exitcode(got[1])
    if main_status is None:
        main_status = -signal.SIGKILL
    return main_status if main_status >= 0 else 128 - main_status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
