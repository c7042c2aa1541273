"""
The plumbing the scripts share, none of it about diffusion: writes that a crash never tears (atomic_write), one
run per output (lock_file), the distributed set-up under torchrun or without it, stopping on a signal at a safe
point, and the --help formatter.
"""

import argparse
import datetime
import errno
import fcntl
import glob
import os
import signal
from contextlib import contextmanager

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------------------------
# files: atomic writes, leftovers, locks

@contextmanager
def atomic_write(path, mode="wb"):
    """Write through a temporary file, renamed into place at the end: a crash never leaves a half-written
    file, and a write that fails (a full disk, an exception in the body) removes the temporary file. Every
    file the scripts write that matters (checkpoints, datasets' meta, samples) goes this way."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_output_folders(*outputs):
    """Stop before any work if an output's folder is missing: `outputs` are (flag, path or None) pairs."""
    for flag, path in outputs:
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise SystemExit(f"error: {flag} {path}: folder {folder} does not exist; create it or pick another")


def save_atomic(obj, path):
    with atomic_write(path) as f:
        torch.save(obj, f)


def remove_stale_tmp(*patterns):
    """Delete what atomic_write left of the files matching the glob `patterns` (their `.tmpPID` files): a killed
    process's leftovers. Call it only where no live process is writing those files."""
    for pattern in patterns:
        for tmp in glob.glob(pattern + ".tmp*"):
            os.remove(tmp)


def lock_file(path, flag, value, script):
    """Take the exclusive lock that lets one `script` run at a time write to `flag value`: a lock on the file
    `path` (created if missing), held while the returned file stays open; released by the OS when the process
    ends, by a crash or SIGKILL too, so no stale lock is ever left behind. SystemExit naming `flag` if a live
    process holds it; None, with a warning, on a filesystem without file locks.

    A POSIX record lock (fcntl.lockf), not flock: a flock lock belongs to the open file, which a forked child
    (a DataLoader worker) shares, so it would outlive a SIGKILL of the main process by the seconds its workers
    take to notice; a record lock belongs to the process and is never inherited by a fork. Its one rule: closing
    any descriptor of `path` in the process drops the lock, so nothing else may open that file. The path is
    checked again once locked, so a lock file that its holder deleted on the way out (unlock) is never taken
    for the file there now."""
    while True:
        f = open(path, "a")  # lockf needs a file open for writing
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise SystemExit(f"{flag} {value} is in use by a live {script} run (it holds {path}); wait for it to "
                                 f"end, or use another {flag}") from None
            print(f"warning: cannot lock {flag} {value} ({e}; a filesystem without file locks?): nothing stops a "
                  f"second run from writing to the same place")
            return None
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                return f
        except FileNotFoundError:
            pass
        f.close()  # its holder deleted it after we opened it: lock the file at `path` now


def unlock(f, remove=False):
    """Release a lock_file lock; `remove`: delete the lock file first, while still holding it."""
    if remove:
        try:
            os.remove(f.name)
        except FileNotFoundError:
            pass
    f.close()



# -----------------------------------------------------------------------------------------------
# command lines: every script's --help lists each flag's default


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, but silent where there is no default to tell (None, False) or
    where the help already states it; the description keeps its line breaks."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help:
            return help
        return (help + " " if help else "") + "(default: %(default)s)"


# -----------------------------------------------------------------------------------------------
# distributed set-up and stopping on a signal, shared by the scripts (with torchrun or without, GPU or CPU)

# How long a rank waits in a collective before the process group gives up (NCCL's default is 10 minutes):
# long enough for rank 0 to write an XL checkpoint (~11 GB with the optimizer) or a sample grid to a slow
# shared filesystem while the other ranks wait at the next collective.
DIST_TIMEOUT = datetime.timedelta(minutes=60)


def setup_dist():
    """(rank, local_rank, world_size, device). Under torchrun: one process group (NCCL on GPU, gloo on
    CPU) with DIST_TIMEOUT. Without torchrun: a single process on cuda:0 or the CPU, no process group."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                             f"set torchrun's --nproc_per_node to at most that")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=DIST_TIMEOUT)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    return rank, local_rank, world, device


def cleanup_dist():
    if dist.is_initialized():
        dist.destroy_process_group()


def from_rank0(obj):
    """Rank 0's `obj` on every rank (the object itself without a process group). For what each rank would
    otherwise read on its own, e.g. which files exist on a shared filesystem, whose view may lag on a node."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # preemption (SLURM --signal, torchrun), Ctrl-C
EXIT_STOPPED = 75  # exit status after a stop by signal: EX_TEMPFAIL of sysexits.h, "try again later"


@contextmanager
def stop_signals():
    """Inside, SIGTERM, SIGUSR1 and SIGINT interrupt nothing: each only appends its number to the yielded
    list, which the loop reads (stop_requested) where stopping is safe. So a second signal while a
    checkpoint is written is recorded and the write goes on. The previous handlers come back on exit."""
    received = []
    old = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of the DataLoaders: a signal sent to the whole process group leaves the workers to the
    main process, which stops at a safe point and shuts them down itself."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def stop_requested(received, device):
    """The signal (a number, 0 for none) that stops all ranks now: with a process group, the largest any rank
    has received (all_reduce MAX), so that every rank stops at the same point. A collective under torchrun:
    every rank must call it at the same points of its loop."""
    if not dist.is_initialized():
        return max(received, default=0)
    s = torch.tensor([max(received, default=0)], device=device)
    dist.all_reduce(s, op=dist.ReduceOp.MAX)
    return int(s.item())
