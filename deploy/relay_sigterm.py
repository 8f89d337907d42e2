"""The trainer container's first process: runs the DeepSpeed launcher and relays SIGTERM to the training ranks.

    python3 relay_sigterm.py deepspeed --num_gpus 8 --module student_trainer ... --resume_from_checkpoint auto

Kubernetes and Docker signal a container's first process only, and DeepSpeed's launcher does not pass
SIGTERM on: the `deepspeed` runner of a single-node launch (with --no_ssh too) has no handler, so as PID 1
it ignores the signal, and under an init it dies at once and the container's end kills the ranks; its
per-node launcher (deepspeed.launcher.launch) signals the ranks one at a time, kills each one still there
after 30 s and exits 1. So this script signals the ranks themselves (the children of
deepspeed.launcher.launch), all at once: they finish their optimizer step, save a checkpoint together and
exit 143, which both launchers and this script pass on. With no rank to signal yet (still starting up)
it stops the command's whole process group. As PID 1 it also reaps the orphans re-parented to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

import psutil

LAUNCHER_MODULE = "deepspeed.launcher.launch"


def training_ranks(root_pid: int) -> list[psutil.Process]:
    """The processes that DeepSpeed's per-node launchers under ``root_pid`` started (the ranks)."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    ranks: list[psutil.Process] = []
    for proc in procs:
        try:
            if LAUNCHER_MODULE in proc.cmdline():
                ranks += proc.children()
        except psutil.Error:  # gone, or a zombie, since the listing
            continue
    return ranks


def relay(child_pid: int, signum: int) -> str:
    """SIGTERM to the ranks under ``child_pid``, else to its process group; what was done, for the log."""
    ranks = training_ranks(child_pid)
    signalled = []
    for proc in ranks:
        try:
            proc.send_signal(signal.SIGTERM)
            signalled.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    name = signal.Signals(signum).name
    if signalled:
        return f"{name}: SIGTERM relayed to the training ranks {signalled}"
    try:
        os.killpg(child_pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"{name}: the command has already exited"
    return f"{name}: no training rank yet, SIGTERM sent to the command's process group"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 64
    child = subprocess.Popen(argv, start_new_session=True)  # its own group: a terminal's ^C reaches this script

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # os.write, not print or logging: a handler may interrupt a write in progress
        os.write(2, f"relay_sigterm: {relay(child.pid, signum)}\n".encode())

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        pid, status = os.wait()  # any child: orphans re-parented to PID 1 are reaped too
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            break
    code = child.returncode
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
