"""
The plumbing the scripts share, what keeps a run safe and a reader can skip: checkpoints read safely
(load_checkpoint) and written in the background (CheckpointWriter), writes that a crash never tears
(atomic_write), one run per output (lock_file), resuming a run (resume_run), the .npz in resumable parts and
the image grids, the distributed set-up under torchrun or without it, stopping on a signal at a safe point, a
run's log, the flags' checks and one-line refusals, seeds, the device's defaults and peak FLOP/s.
"""

import argparse
import datetime
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import pickle
import signal
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

# -----------------------------------------------------------------------------------------------
# files: checkpoints read safely, atomic writes, leftovers, locks

class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


def load_checkpoint(path, allow_pickle=False):
    """torch.load with weights_only=True and messages that say what went wrong. Memory-mapped (mmap=True):
    a tensor is read from the file (through the page cache, which the ranks of one host share) only when it
    is used, so what the caller never touches (a sampler's optimizer state) costs no memory."""
    if os.path.isdir(path):
        inside = os.path.join(path, "ckpt.pt")
        hint = f"; did you mean {inside}?" if os.path.isfile(inside) else " (a checkpoint is a file, e.g. RUN/ckpt.pt)"
        raise FileNotFoundError(f"checkpoint '{path}' is a folder, not a file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    mmap = zipfile.is_zipfile(path)  # torch.save's format since torch 1.6; the legacy one cannot be mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        globals_ = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        if not globals_:  # not a refused Python object: garbage bytes
            raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint (truncated or corrupt?)") from None
        if not allow_pickle:
            raise CheckpointError(
                f"'{path}' holds Python objects that only pickle can read, and unpickling can run arbitrary "
                f"code ({globals_[0].split(' was ')[0]}). If you trust the file, pass allow_pickle=True "
                f"(--allow-pickle on the command line).") from None
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


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


def check_writable(*outputs):
    """Stop before any work unless each output can be written: `outputs` are (flag, path or None) pairs of files;
    a file's folder must exist and take a new file (tried with a temporary file, removed)."""
    for flag, path in outputs:
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                refuse(f"error: {flag} {path}: folder {folder} does not exist; create it or pick another")
            try_write(flag, path, folder)


def check_writable_dir(flag, path):
    """Stop before any work unless the folder `path` can be written, or made where it does not exist yet (its
    nearest existing parent must take a new file); nothing is made."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        refuse(f"error: {flag} {path}: {folder} is a file, not a folder; pick another {flag}")
    try_write(flag, path, folder)


def try_write(flag, path, folder):
    try:
        with tempfile.TemporaryFile(dir=folder):  # made and removed
            pass
    except OSError as e:
        refuse(f"error: {flag} {path}: cannot write in {folder} ({e.strerror}); pick another place")


def refuse(message):
    """Stop a script with `message` (exit status 1), printed by rank 0 only: for refusals that every rank of a
    torchrun job makes alike (a flag, the dataset), so the message is read once (rank from torchrun's RANK)."""
    raise SystemExit(message if int(os.environ.get("RANK", 0)) == 0 else 1)


def json_cache(paths, key, compute):
    """(value, the path it was found in) for `key` (a string) in the first of the JSON files `paths` that holds it;
    else (compute(), None), the value stored under `key` in the first of `paths` that can be written."""
    def read(path):  # a missing or unreadable file is an empty cache
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    for path in paths:
        if key in (cache := read(path)):
            return cache[key], path
    value = compute()
    for path in paths:
        try:
            with atomic_write(path, "w") as f:
                json.dump(read(path) | {key: value}, f, indent=1)
            break
        except OSError:
            continue
    return value, None


def save_atomic(obj, path):
    """torch.save through atomic_write; a failed write (a full disk) stops the script with a message naming the
    file, whose previous version, if any, is kept."""
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path} ({e.strerror or e}); the file there before, if any, is kept: "
                         f"free the space and rerun the same command") from None


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


def lock_run_dir(out_dir, script, own_files):
    """The lock of a run folder (lock_file on OUT/<script stem>.lock, the folder made if missing), held while the
    returned file stays open. With the lock, the temporary files that a killed run's atomic writes left of its
    `own_files` (glob patterns inside the folder) are removed: no live run is writing them."""
    os.makedirs(out_dir, exist_ok=True)
    f = lock_file(os.path.join(out_dir, os.path.splitext(script)[0] + ".lock"), "--out-dir", out_dir, script)
    if f is not None:
        remove_stale_tmp(*(os.path.join(glob.escape(out_dir), p) for p in own_files))
    return f


def unlock(f, remove=False):
    """Release a lock_file lock; `remove`: delete the lock file first, while still holding it."""
    if remove:
        try:
            os.remove(f.name)
        except FileNotFoundError:
            pass
    f.close()


# -----------------------------------------------------------------------------------------------
# images out: the ADM .npz, in resumable parts, and labelled grids


def save_npz(path, images, labels):
    """ADM evaluator layout: arr_0 uint8 (N, H, W, 3), arr_1 int64 (N,); written atomically."""
    with atomic_write(path) as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, arr_0=np.asarray(images, dtype=np.uint8), arr_1=np.asarray(labels, dtype=np.int64))


def save_grid(path, images, labels, class_names=None, per_row=10):
    """One row per class, in the order the classes first appear, its name (or index) at the left in a margin as
    wide as the longest name; a class with more than `per_row` images takes more rows. Small images are enlarged
    (nearest neighbour) to at least 64 px so that they can be seen. The grids of sample.py and train.py."""
    up = max(1, 64 // images.shape[1])
    images = images.repeat(up, axis=1).repeat(up, axis=2)
    _, H, W, _ = images.shape
    font = ImageFont.load_default()
    names = {y: class_names[y] if class_names else str(y) for y in labels}
    rows = []  # (label, indices of its images), at most per_row each
    for y in dict.fromkeys(labels):
        idx = [i for i, l in enumerate(labels) if l == y]
        rows += [(y if k == 0 else None, idx[k:k + per_row]) for k in range(0, len(idx), per_row)]
    margin = 8 + max(round(font.getlength(n)) for n in names.values())
    cols, gap = max(len(idx) for _, idx in rows), 2  # gap: white between the images
    canvas = Image.new("RGB", (margin + cols * (W + gap), len(rows) * (H + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (y, idx) in enumerate(rows):
        if y is not None:
            draw.text((4, r * (H + gap) + H // 2), names[y], fill="black", font=font, anchor="lm")
        for c, i in enumerate(idx):
            canvas.paste(Image.fromarray(images[i]), (margin + c * (W + gap), r * (H + gap)))
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    with atomic_write(path) as f:
        canvas.save(f, format=fmt)


PART_WAIT = 600  # s: how long rank 0 waits for the files of ranks that have all finished (a shared filesystem may
# show a file late on another node); longer means the filesystem is not shared, or a file was lost


def wait_for_files(paths, received, poll=None, timeout=None):
    """Rank 0, once every rank has finished: wait up to `timeout` s (default PART_WAIT) until every one of `paths`
    exists, calling `poll` between looks. Returns (the paths still missing, the stop signal that ended the wait
    or 0); a signal in `received` (stop_signals) ends it at once."""
    deadline = time.time() + (PART_WAIT if timeout is None else timeout)
    while (missing := [p for p in paths if not os.path.exists(p)]) and not received and time.time() < deadline:
        time.sleep(0.2)
        if poll is not None:
            poll()
    return missing, (received[0] if missing and received else 0)


class Parts:
    """sample.py --npz's finished batches, resumable: NPZ_parts/START_END_TAG.npz, TAG naming the settings (so parts
    of other settings never mix in). Rank 0 lists the batches left for all ranks (one list: every batch has one
    owner, every rank makes the same number of rounds), before any rank writes new parts. Without --npz: no
    files, all batches left."""

    def __init__(self, npz, settings, n, batch_size):
        tag = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:10]  # parts of other settings never mix in
        self.npz, self.tag, self.n = npz, from_rank0(tag), n  # rank 0 decides: every rank names parts alike
        self.dir = os.path.splitext(npz)[0] + "_parts" if npz else None
        self.chunks = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        rank = rank_world()[0]
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
            if rank == 0:  # what a killed run's atomic writes left (no rank writes before the list below)
                remove_stale_tmp(os.path.join(glob.escape(self.dir), "*"), glob.escape(npz))
        todo = [c for c in self.chunks if not (self.dir and os.path.exists(self.path(*c)))] if rank == 0 else None
        self.todo = from_rank0(todo)

    def path(self, s, e):
        return os.path.join(self.dir, f"{s:07d}_{e:07d}_{self.tag}.npz")

    def join(self, labels, received=()):
        """The parts joined (in order) into the ADM .npz, then removed with their folder; returns the images. Under
        torchrun rank 0 first waits (wait_for_files) for parts that other nodes wrote and a shared filesystem shows
        late; a stop signal (in `received`) ends the wait with EXIT_STOPPED, keeping the parts."""
        paths, images, s = [self.path(*c) for c in self.chunks], None, 0
        missing, signum = wait_for_files(paths, received, timeout=None if rank_world()[1] > 1 else 0)
        if signum:
            raise stopped(signum, f"the finished parts are kept in {self.dir}")
        if missing:
            raise SystemExit(f"error: {len(missing)} part(s) of --npz {self.npz} (e.g. {missing[0]}) are missing "
                             f"after every rank finished (is it on a filesystem all the ranks share?); the finished "
                             f"parts are kept: rerun the same command to resume")
        for path in paths:
            with np.load(path) as f:
                images = np.empty((self.n, *f["arr_0"].shape[1:]), np.uint8) if images is None else images
                images[s:s + len(f["arr_0"])] = f["arr_0"]
                s += len(f["arr_0"])
        save_npz(self.npz, images, labels)
        for path in paths:
            os.remove(path)
        if not os.listdir(self.dir):
            os.rmdir(self.dir)
        print(f"wrote {self.npz}: arr_0 uint8 {images.shape}, arr_1 int64 labels")
        return images


# -----------------------------------------------------------------------------------------------
# a run's log: a line on stdout and a JSON record a line in a file, by rank 0


class RunLog:
    """Rank 0 prints each record as a line (format_record) and appends it to `path` as JSON; other ranks print and
    write nothing. `steps` makes the record of the steps since the last one."""

    def __init__(self, path, step, max_steps):
        self.path, self.rank, self.max_steps = path, rank_world()[0], max_steps
        self.since, self.t0 = step, time.time()

    def steps(self, step, sums, names, images_per_step, flops_per_image):
        """The record of the steps since the last one: the means of `sums` (a device tensor of the quantities
        `names`, summed over those steps; all-reduced here over the ranks: one host sync a line, none a step),
        steps/s, images/s, MFU (on a GPU peak_flops knows), peak memory, the time left at this pace. Zeroes `sums`."""
        world = rank_world()[1]
        if world > 1:
            dist.all_reduce(sums)
        n, secs = step - self.since, time.time() - self.t0
        rec = {"step": step} | dict(zip(names, (sums / (n * world)).tolist()))
        rec |= {"steps_per_s": n / secs, "images_per_s": n / secs * images_per_step}
        if peak := peak_flops(sums.device):
            rec["mfu"] = rec["images_per_s"] / world * flops_per_image / peak
        if sums.device.type == "cuda":
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(sums.device) / 2 ** 30
        sums.zero_()
        self.since, self.t0 = step, time.time()
        return rec | {"time_left": duration((self.max_steps - step) * secs / n)}

    def write(self, rec):
        self.print(format_record(rec))
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def print(self, line):
        print0(line)

    def pause(self, seconds):
        """Leave `seconds` (a validation) out of the steps' speed."""
        self.t0 += seconds


def print0(line):
    """Print on rank 0 only (every process without a process group)."""
    if rank_world()[0] == 0:
        print(line, flush=True)


def format_record(rec):
    """A log record as the printed line: `key value | ...`, numbers to 4 significant digits."""
    def fmt(v):
        if isinstance(v, list):
            return "[" + " ".join(map(fmt, v)) + "]"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return " | ".join(f"{k} {fmt(v)}" for k, v in rec.items())


def truncate_log(log_path, step):
    """Drop the lines of a JSON-lines log after `step` (a resumed run redoes those steps) and any line torn by a
    crash."""
    if not os.path.exists(log_path):
        return
    kept = []
    with open(log_path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by a crash mid-write
                continue
    with atomic_write(log_path, "w") as f:
        f.writelines(kept)


def duration(seconds):
    """'1h05m', '7m12s' or '42s'."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def mix_seed(a, b):
    """A torch generator's seed from two integers (a run's seed and a step, an image's index, ...), the same in
    every script (numpy's generators, which train.py's data order uses, take the pair itself)."""
    return a * 1_000_003 + b


# dense bf16 peaks (data sheets, without sparsity), first match of the device name wins: the H100 PCIe and NVL
# cards run slower clocks than the SXM one ("NVIDIA H100 80GB HBM3")
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12))


def peak_flops(device):
    """Dense bf16 peak FLOP/s of the GPU, for MFU; None where unknown (the CPU, an unlisted card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


def check_number(flag, value, lo=None, hi=None, open_lo=False):
    """A ValueError naming `flag` unless `value` is a finite number in [lo, hi] ((lo, hi] with open_lo; None: no
    bound)."""
    if problem := out_of_range(value, lo, hi, open_lo):
        raise ValueError(f"{flag} {problem}")


def out_of_range(value, lo=None, hi=None, open_lo=False, open_hi=False):
    """What is wrong with `value` as a finite number in [lo, hi] (an open end where told; None: no bound), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if lo is not None and (value <= lo if open_lo else value < lo) or hi is not None and (
            value >= hi if open_hi else value > hi):
        want = ([f"above {lo}" if open_lo else f"at least {lo}"] if lo is not None else []) + \
            ([f"below {hi}" if open_hi else f"at most {hi}"] if hi is not None else [])
        return f"must be {' and '.join(want)}, got {value}"
    return None


def autocast(device, precision):
    """bf16 autocast on `device` for precision "bf16"; nothing (plain float32) for "fp32"."""
    return torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else nullcontext()


@contextmanager
def compile_errors():
    """Inside, inductor's failure to build its code (train.py --compile) becomes a message naming --compile."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as e:
        raise SystemExit(f"--compile: torch.compile cannot compile the model on this machine "
                         f"({str(e).strip().splitlines()[0]}); run without --compile") from None


# -----------------------------------------------------------------------------------------------
# command lines: every script's --help lists each flag's default


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with HelpFormatter, whose errors are like every other refusal of the scripts: a
    SystemExit with a one-line message (exit status 1, no usage block), raised before any work."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        refuse(f"{self.prog}: error: {message} (--help lists the flags)")


def number(kind=float, lo=None, hi=None, open_lo=False, open_hi=False):
    """An argparse type: a finite `kind` (int or float) in [lo, hi] (an open end where told; None: no bound).
    A bad value stops the script at start-up with a message naming the flag."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if problem := out_of_range(value, lo, hi, open_lo, open_hi):
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


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


def setup_dist(tf32=True):
    """(rank, local_rank, world_size, device). Under torchrun: one process group (NCCL on GPU, gloo on
    CPU) with DIST_TIMEOUT. Without torchrun: a single process on cuda:0 or the CPU, no process group. On a GPU
    with `tf32`, float32 matmuls and convolutions use TF32 (as DiT and nanoGPT set it), without it neither (the
    scripts pass False where the user asked for float32: --precision fp32), until cleanup_dist."""
    if torch.cuda.is_available():
        SAVED["tf32"] = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
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
    if "tf32" in SAVED:
        matmul, torch.backends.cudnn.allow_tf32 = SAVED.pop("tf32")
        torch.set_float32_matmul_precision(matmul)


SAVED = {}  # what setup_dist changed, for cleanup_dist


def rank_world():
    """(rank, world size): (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def from_rank0(obj):
    """Rank 0's `obj` on every rank (the object itself without a process group). For what each rank would
    otherwise read on its own, e.g. which files exist on a shared filesystem, whose view may lag on a node."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(d):
    """The union of every rank's dict `d` (all ranks get it: all_gather_object), after a barrier."""
    if not dist.is_initialized():
        return d
    out = {k: v for part in all_gather(d) for k, v in part.items()}
    dist.barrier()
    return out


def sum_over_ranks(values, device):
    """[sum over the ranks of each of `values`] (numbers), as floats."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather(obj):
    """[every rank's obj] ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def weights_digest(model):
    """sha1 of a model's weights (names, dtypes, shapes, bytes): which weights a rank holds."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def same_on_all_ranks(value, device, what):
    """`value` (an int) after checking that every rank has it; SystemExit `what` (naming the values) if not."""
    if not dist.is_initialized():
        return value
    v = torch.tensor([value, -value], device=device)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    if v[0].item() != -v[1].item():
        raise SystemExit(what.format(lo=-v[1].item(), hi=v[0].item()))
    return value


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


def resume_run(out_dir, checks, modules, opt, hyper, device):
    """The step of OUT/ckpt.pt, 0 if there is none, for every rank (they must agree: a node-local --out-dir would
    not). The checkpoint must hold for each key of `checks` the value given (key: (value, what to do if not);
    a checkpoint without the key passes); then each of `modules` (key: nn.Module or None) loads its state and
    `opt` its own, with `hyper` (lr, betas, ...) in place of the stored values. Rank 0 also makes OUT/samples/
    and trims OUT/log.jsonl to the step (the later lines are redone)."""
    path, step = os.path.join(out_dir, "ckpt.pt"), 0
    if os.path.exists(path):
        try:
            ckpt = load_checkpoint(path)
        except ValueError as e:
            raise SystemExit(f"cannot resume: {e}\nMove {path} away to start over, or copy a kept ckpt_STEP.pt "
                             f"(--keep-every) in its place.") from None
        for key, (wanted, fix) in checks.items():
            if ckpt.get(key, wanted) != wanted:
                raise SystemExit(f"{path} was trained with {key} {ckpt[key]}, but the flags give {wanted}: {fix}")
        try:
            for key, module in modules.items():
                if module is not None:
                    module.load_state_dict(ckpt[key])
            for group in ckpt["optimizer"]["param_groups"]:  # `fused` must be this device's before loading: it
                group.update(hyper, fused=opt.defaults["fused"])  # decides where the step counts go
            opt.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise SystemExit(f"cannot resume: {path} does not hold this run's state ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]}); move it away to start over") from None
        step = ckpt["step"]
    if rank_world()[0] == 0:
        if step:
            print(f"resumed {path} at step {step}")
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        truncate_log(os.path.join(out_dir, "log.jsonl"), step)
    return same_on_all_ranks(step, device, "ranks resumed from different steps ({lo} to {hi}): --out-dir "
                             f"{out_dir} must be one folder that all nodes share")


def check_finite(sums, since, step, args):
    """train.py, at a sync point: stop if a step since `since` had a non-finite loss or gradient (`sums` of them on
    the device), whose update AdamW skipped; the message says what is kept and what to try. Every rank stops at the
    same step: the gradient norm is of the all-reduced gradients, the same on every rank, and a non-finite loss
    makes it non-finite too. A rerun replays the same draws, so the tips are flags a resume may change."""
    if torch.isfinite(sums).all():
        return
    ckpt = os.path.join(args.out_dir, "ckpt.pt")
    kept = (f"{ckpt} keeps the last state written (rerunning resumes from it)" if os.path.exists(ckpt)
            else "no checkpoint was written before it")
    tips = ("check the data, lower --lr or clip (--grad-clip 1)" + (", or try --precision fp32" if args.precision !=
                                                                     "fp32" else "") + "; each may change on resume")
    steps = f"step {step}" if step - since == 1 else f"a step of {since + 1}..{step}"
    refuse(f"non-finite loss or gradient at {steps}; AdamW skipped its update and the run stopped: {kept}; {tips}")


def device_defaults(args, device):
    """The flags whose default depends on the device (those `args` has): on a GPU bf16 autocast, torch.compile and
    4 data loader workers a rank; on the CPU float32, eager and 2 workers."""
    gpu = device.type == "cuda"
    args.precision = getattr(args, "precision", None) or ("bf16" if gpu else "fp32")
    for flag, on_gpu, on_cpu in (("compile", True, False), ("num_workers", 4, 2)):
        if hasattr(args, flag) and getattr(args, flag) is None:
            setattr(args, flag, on_gpu if gpu else on_cpu)


def stopped(signum, kept):
    """The SystemExit (EXIT_STOPPED) of a job that signal `signum` stopped, rank 0 saying what is `kept`: raise it."""
    print0(f"stopped by {signal.Signals(signum).name}: {kept}; rerun the same command to resume")
    return SystemExit(EXIT_STOPPED)


def stop_run(signum, step, writer):
    """Every rank, after a training step at which stop_requested found `signum`: rank 0 waits for the checkpoint
    being written (`writer`); a barrier, so that no rank exits before it (torchrun would end the others); exit
    with EXIT_STOPPED."""
    rank, world = rank_world()
    if rank == 0:
        writer.join()
    if world > 1:
        dist.barrier()
    if rank == 0:
        print(f"stopped by {signal.Signals(signum).name} at step {step}: rerun the same command to resume", flush=True)
    raise SystemExit(EXIT_STOPPED)


class CheckpointWriter:
    """Writes checkpoints (save_atomic) in a background thread, so that training goes on while the disk works:
    save() waits for the write before, takes a CPU copy of the state (all a step waits for) and starts the write;
    join() waits for it. A failed write is raised by the next save() or join()."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, state, paths):
        self.join()
        state = cpu_copy(state)
        self.thread = threading.Thread(target=self.write, args=(state, paths))  # not a daemon: the interpreter
        self.thread.start()  # waits for it at exit, a crash of the main thread too

    def write(self, state, paths):
        try:
            for path in paths:
                save_atomic(state, path)
        except BaseException as e:  # save_atomic's SystemExit too: raised in the main thread by join()
            self.error = e

    def join(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def cpu_copy(obj):
    """`obj` (dicts, lists of tensors and plain values) with every tensor copied to the CPU: a snapshot that
    training can no longer change."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj
