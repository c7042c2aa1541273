"""
Encode an image dataset once into the nanoDDT dataset directory that train.py reads: one memmapped array of VAE
posteriors (mean and std, so that training draws a fresh sample mean + std * eps each time), labels, a validity
mask, optionally the cropped pixels (for REPA), and meta.json.

    # ImageNet train/ (one subfolder per class) through the SD-VAE, 256 px, with pixels for REPA
    torchrun --nproc_per_node=8 prepare_latents.py --data-path /data/imagenet/train \
        --vae /ckpt/sd-vae-ft-ema --resolution 256 --images --out data/in256
    # the same on one GPU or the CPU (no torchrun); rerun the same command to resume after an interruption
    python prepare_latents.py --data-path /data/imagenet/train --vae /ckpt/sd-vae-ft-ema --out data/in256
    # pixel space: the "latent" is the image in [-1, 1] with std 0
    python prepare_latents.py --data-path my_images/ --vae none --resolution 64 --images --out data/px64
    # the built-in toy set (10 bold shape/pattern classes, 32 x 32, 5000 images) for the CPU quick start, and its
    # held-out split for train.py --val-data (1000 other seeded images of the same classes)
    python prepare_latents.py --toy --out data/toy
    python prepare_latents.py --toy --split val --out data/toy_val

OUT/latents.npy       float16 (N, 2, C, h, w): [:, 0] posterior mean, [:, 1] std (unscaled latents)
OUT/latents_flip.npy  the same for the horizontally flipped images (--flip; off in the paper)
OUT/labels.npy        int64 (N,);  OUT/valid.npy  bool (N,), False for an unreadable file or a non-finite latent
                      (their latent rows are zero), rows that training never reads
OUT/images.npy        uint8 (N, R, R, 3) center crops (--images)
OUT/meta.json         count, shapes, class names, VAE and scaling factor, per-channel latent mean/std, ...;
                      written last, it marks the dataset complete
Images are center-cropped as ADM/DiT do (center_crop_arr). Work goes in chunks of --chunk-size images, spread
over the ranks, with the same batches whatever the number of ranks (so the result does not depend on it). Only
rank 0 writes the arrays above: another rank writes each chunk it finishes to a file of its own,
OUT/.progress/chunk_XXXXXX.npz, which rank 0 copies in and deletes, so no two ranks (nor hosts) ever write to
the same file, nor to the same page of a shared filesystem. A chunk in the arrays leaves
OUT/.progress/chunk_XXXXXX.done; a rerun with the same settings skips the chunks with either file. Rank 0 alone
looks at the filesystem: it lists the images and decides what to do with OUT (new, resume, done) for all ranks.
SIGTERM, SIGUSR1 or SIGINT to any rank stops every rank after the same batch (the signal is all-reduced after each
batch, as in train.py), keeping the finished chunks (exit status 75).
"""

import glob
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import plumbing
import pretrained

FORMAT_VERSION = 1
IMAGE_EXTS = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}  # compared lower-case: .JPEG, .PNG, ... match too
OUTPUT_FILES = ("meta.json", "settings.json", "latents.npy", "latents_flip.npy", "labels.npy", "valid.npy",
                "images.npy", ".progress")  # in the order create_files removes them
TOY_CLASSES = {"red_disk": (230, 30, 30), "blue_square": (40, 80, 250), "green_triangle": (30, 200, 50),
               "yellow_cross": (245, 225, 30), "magenta_ring": (235, 40, 225), "cyan_diamond": (30, 225, 235),
               "orange_x": (255, 140, 0), "horizontal_stripes": (240, 240, 240),
               "vertical_stripes": (165, 80, 255), "checkerboard": (255, 140, 185)}  # name: RGB colour
TOY_SPLITS = {"train": (500, 0), "val": (100, 1)}  # --split: images per class, seed of make_toy_images


def center_crop_arr(pil_image, image_size):
    """ADM/DiT center crop: halve with BOX while the short side is >= 2x the target, resize the short side
    to image_size with BICUBIC, crop the center. Returns uint8 (image_size, image_size, 3)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def list_images(root):
    """Class-per-subfolder tree (ImageNet train/ layout) -> (files, labels int64 (N,), class_names).
    Classes are the sorted subfolder names (labels 0..K-1); files (any depth below the class folder, hidden
    ones skipped) are sorted within each class."""
    if not os.path.isdir(root):
        raise SystemExit(f"--data-path {root}: no such folder")
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise SystemExit(f"--data-path {root}: no class subfolders (expected one subfolder of images per class)")
    files, labels = [], []
    for label, name in enumerate(class_names):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [os.path.join(dirpath, f) for f in filenames
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS]
        if not found:
            print(f"warning: class folder {os.path.join(root, name)} holds no images", file=sys.stderr)
        files += sorted(found)
        labels += [label] * len(found)
    if not files:
        raise SystemExit(f"--data-path {root}: no images ({', '.join(sorted(IMAGE_EXTS))}) in its class subfolders")
    return files, np.array(labels, dtype=np.int64), class_names


def make_toy_images(n_per_class=500, size=32, seed=0):
    """The built-in toy set: 10 bold shape/pattern classes (TOY_CLASSES), each with its own colour, on a dark
    tinted background, with random position/size/phase/colour jitter and a little noise. Deterministic.
    Returns (images uint8 (N, size, size, 3), labels int64 (N,), class_names), N = 10 * n_per_class."""
    rng = np.random.default_rng(seed)
    n = n_per_class
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size  # (S, S) pixel centres in [0, 1]
    images = []
    for name, colour in TOY_CLASSES.items():
        cx, cy = rng.uniform(0.38, 0.62, (2, n, 1, 1))  # shape centre
        r = rng.uniform(0.22, 0.32, (n, 1, 1))  # shape "radius", fraction of the image
        dx, dy = x - cx, y - cy  # (n, S, S)
        period = rng.uniform(0.1, 0.16, (n, 1, 1))  # stripe / square width, fraction of the image
        phase = rng.uniform(0, 2, (2, n, 1, 1))
        box = np.maximum(abs(dx), abs(dy))  # (n, S, S) distance to the centre in the max norm
        masks = {  # computed on demand: only this class's one
            "red_disk": lambda: dx ** 2 + dy ** 2 < r ** 2,
            "blue_square": lambda: box < 0.85 * r,
            "green_triangle": lambda: (abs(dx) < 0.6 * (dy + r)) & (dy < r),
            "yellow_cross": lambda: (np.minimum(abs(dx), abs(dy)) < 0.33 * r) & (box < r),
            "magenta_ring": lambda: abs(np.sqrt(dx ** 2 + dy ** 2) - 0.75 * r) < 0.25 * r,
            "cyan_diamond": lambda: abs(dx) + abs(dy) < 1.15 * r,
            "orange_x": lambda: (np.minimum(abs(dx - dy), abs(dx + dy)) < 0.45 * r) & (box < r),
            "horizontal_stripes": lambda: (y / period + phase[0]) % 2 < 1,
            "vertical_stripes": lambda: (x / period + phase[0]) % 2 < 1,
            "checkerboard": lambda: (np.floor(x / period + phase[0]) + np.floor(y / period + phase[1])) % 2 == 0,
        }
        fg = np.array(colour) + rng.uniform(-30, 30, (n, 1, 1, 3))  # (n, 1, 1, 3)
        bg = rng.uniform(15, 75, (n, 1, 1, 1)) + rng.uniform(-15, 15, (n, 1, 1, 3))
        img = np.where(masks[name]()[..., None], fg, bg) + 5 * rng.standard_normal((n, size, size, 3), np.float32)
        images.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    labels = np.repeat(np.arange(len(TOY_CLASSES), dtype=np.int64), n)
    return np.concatenate(images), labels, list(TOY_CLASSES)


class ImageFiles(Dataset):
    """files[i] -> (i, uint8 (R, R, 3) center crop, error). An unreadable file gives zeros and its error."""

    def __init__(self, files, resolution):
        self.files, self.resolution = files, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB")
        except Exception as e:  # any decoder failure means one bad file: reported and marked invalid, not fatal
            return i, torch.zeros(self.resolution, self.resolution, 3, dtype=torch.uint8), f"{type(e).__name__}: {e}"
        return i, torch.from_numpy(np.ascontiguousarray(center_crop_arr(im, self.resolution))), ""


@torch.no_grad()
def encode_batch(vae, images, precision="fp32"):
    """uint8 (B, H, W, 3) -> float32 (B, 2, C, h, w) on the CPU: posterior mean and std (unscaled).
    vae=None: pixel space, mean = the image in [-1, 1], std = 0."""
    device = "cpu" if vae is None else next(vae.parameters()).device
    x = images.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
    if vae is None:
        return torch.stack([x, torch.zeros_like(x)], 1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with torch.autocast(x.device.type, dtype=dtype, enabled=precision != "fp32"):
        mean, logvar = vae.encode(x)  # (B, C, h, w) each
    std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))  # the clamp of diffusers' DiagonalGaussian
    return torch.stack([mean.float(), std], 1).cpu()


def read_meta(data_dir, flag="--data"):
    """A dataset's meta.json, or a message naming the folder (its flag: --data, --val-data) and what to do."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        plumbing.refuse(f"{flag} {data_dir}: no meta.json there; make the dataset with prepare_latents.py "
                        f"(an interrupted prepare_latents run writes meta.json only when it finishes)")
    with open(meta_path) as f:
        return json.load(f)


def write_json(obj, path):
    with plumbing.atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def check_out(out, settings, overwrite):
    """What to do with --out: "new", "resume" (same settings, not finished) or "done" (same settings, finished).
    "new": nothing of ours there; or .progress/ without settings.json and meta.json, a dataset whose creation
    was cut short (create_files), with nothing encoded yet; or, with --overwrite, a dataset made with other
    settings or a finished one. An unfinished dataset with the same settings is resumed with --overwrite too,
    so that rerunning a stopped command never throws its work away. A dataset made with other settings stops
    the run without --overwrite."""
    def exists(f):
        return os.path.exists(os.path.join(out, f))

    finished = exists("meta.json")
    if not any(map(exists, OUTPUT_FILES)) or (exists(".progress") and not exists("settings.json") and not finished):
        return "new"
    old = None
    if exists("settings.json"):
        with open(os.path.join(out, "settings.json")) as f:
            old = json.load(f)
    if old == settings:
        return "resume" if not finished else "new" if overwrite else "done"
    if overwrite:
        return "new"
    diff = "no settings.json" if old is None else ", ".join(
        f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
        if old.get(k) != settings.get(k))
    raise SystemExit(f"--out {out} already holds a dataset made with other settings ({diff}); "
                     f"choose another --out, or pass --overwrite to replace it")


def create_files(out, arrays, labels, settings):
    """Fresh dataset files in `out` (ours only are removed), in an order that leaves check_out a state it reads
    right wherever a kill stops it: .progress/ first (a dataset being made), then meta.json and settings.json go
    (no old dataset is claimed any more), the old arrays and chunk markers, the new arrays; settings.json last,
    which makes a rerun resume."""
    progress = os.path.join(out, ".progress")
    os.makedirs(progress, exist_ok=True)
    for f in OUTPUT_FILES:
        path = os.path.join(out, f)
        if f == ".progress":
            for g in os.listdir(path):
                os.remove(os.path.join(path, g))
        elif os.path.exists(path):
            os.remove(path)
    for name, (dtype, shape) in arrays.items():
        np.lib.format.open_memmap(os.path.join(out, name), mode="w+", dtype=dtype, shape=shape).flush()
    np.save(os.path.join(out, "labels.npy"), labels)
    write_json(settings, os.path.join(out, "settings.json"))


def latent_stats(latents, valid, block=4096):
    """Per-channel mean and std of the posterior means over the valid rows (float64 sums, read in blocks)."""
    s, s2, count = 0.0, 0.0, 0
    for a in range(0, len(latents), block):
        m = latents[a: a + block, 0][valid[a: a + block]].astype(np.float64)  # (b, C, h, w)
        s, s2, count = s + m.sum((0, 2, 3)), s2 + (m ** 2).sum((0, 2, 3)), count + m[:, 0].size
    mean = s / count
    return mean.tolist(), np.sqrt(np.maximum(s2 / count - mean ** 2, 0)).tolist()


def array_specs(N, latent_shape, settings):
    """The dataset's arrays: file name -> (dtype, shape)."""
    arrays = {"latents.npy": (np.float16, (N, 2, *latent_shape)), "valid.npy": (np.bool_, (N,))}
    if settings["flip"]:
        arrays["latents_flip.npy"] = (np.float16, (N, 2, *latent_shape))
    if settings["images"]:
        R = settings["resolution"]
        arrays["images.npy"] = (np.uint8, (N, R, R, 3))
    return arrays


def write_meta(out, settings, latent_shape, scaling_factor, class_names, files):
    """OUT/meta.json, written last: it marks the dataset complete (with the latents' per-channel statistics)."""
    latents, valid = np.load(os.path.join(out, "latents.npy"), mmap_mode="r"), np.load(os.path.join(out, "valid.npy"))
    N = len(valid)
    if not valid.any():
        raise SystemExit(f"none of the {N} images could be read; see the warnings above")
    mean, std = latent_stats(latents, valid)
    meta = {"format_version": FORMAT_VERSION, "count": N, "latent_shape": list(latent_shape),
            "resolution": settings["resolution"], "vae": settings["vae"], "scaling_factor": scaling_factor,
            "class_names": list(class_names), "num_classes": len(class_names), "flip": settings["flip"],
            "has_images": settings["images"], "latent_mean": mean, "latent_std": std, "num_valid": int(valid.sum()),
            "invalid_files": [files[i] if files else str(i) for i in np.flatnonzero(~valid)]}
    write_json(meta, os.path.join(out, "meta.json"))
    print(f"wrote {out}: {N} images ({N - meta['num_valid']} invalid), {len(class_names)} classes, latents "
          f"(2, {', '.join(map(str, latent_shape))}), per-channel mean {np.round(mean, 3).tolist()} std "
          f"{np.round(std, 3).tolist()}")


def wait_for_chunks(out, markers, copy_in_parts, received, stopped):
    """Rank 0, once every rank has finished: copy in the other ranks' chunks until every marker is there
    (plumbing.wait_for_files); a stop signal stops the wait."""
    copy_in_parts()
    missing, signum = plumbing.wait_for_files(markers, received, poll=copy_in_parts)
    if signum:
        raise stopped(signum)
    if missing:
        chunks = [int(os.path.basename(m)[len("chunk_"):-len(".done")]) for m in missing]
        raise SystemExit(f"rank 0: chunk(s) {chunks[:5]}{' ...' if len(chunks) > 5 else ''} of the other ranks are "
                         f"still not in {out}/.progress {plumbing.PART_WAIT} s after every rank finished them (is "
                         f"--out on a filesystem all the ranks share?); the finished chunks are kept: rerun the same "
                         f"command to resume")


class DatasetWriter:
    """Encodes a dataset (items (i, uint8 (R, R, 3), error string)) into the dataset directory `out`, on every
    rank. `settings` (JSON-able: resolution, vae, vae_precision, flip, images, chunk_size, and what identifies
    the input) fixes what is written; it is kept in out/settings.json so that a rerun resumes or refuses. Rank 0
    decides what to do with `out` and which chunks are left, for all ranks (decided_by_rank0); chunk c is in
    the arrays when out/.progress/chunk_c.done exists, and a chunk that another rank finished waits in
    out/.progress/chunk_c.npz until rank 0 copies it in. A signal in `received` (plumbing.stop_signals) on any
    rank stops every rank after the same batch (plumbing.stop_requested after each batch, a collective; so a
    rank that crashes also stops the others, at their next batch, or at the process group's timeout where the
    backend cannot tell)."""

    def __init__(self, out, settings, vae, received, device):
        self.out, self.settings, self.vae, self.received, self.device = out, settings, vae, received, device
        self.rank, self.world = plumbing.rank_world()
        self.cs, R = settings["chunk_size"], settings["resolution"]
        self.latent_shape = encode_batch(vae, torch.zeros(1, R, R, 3, dtype=torch.uint8),
                                         settings["vae_precision"]).shape[2:]  # (C, h, w)
        self.mm, self.rows = {}, {}  # the arrays (rank 0 only, open for writing); chunk -> its rows being encoded

    def marker(self, c):  # chunk c is in the arrays
        return os.path.join(self.out, ".progress", f"chunk_{c:06d}.done")

    def part(self, c):  # chunk c, finished by a rank other than 0, waiting for rank 0 to copy it in
        return os.path.join(self.out, ".progress", f"chunk_{c:06d}.npz")

    def end(self, c):
        return min((c + 1) * self.cs, self.N)

    def write(self, dataset, labels, class_names, files=None, batch_size=64, num_workers=4, overwrite=False):
        """Encode `dataset` (labels, class_names; `files`: its file names, for the messages), resuming what an
        earlier run of the same settings finished; rank 0 writes meta.json last."""
        self.N, self.files = len(dataset), files
        self.arrays = array_specs(self.N, self.latent_shape, self.settings)
        state, todo = decided_by_rank0(self.rank, self.prepare, labels, overwrite)
        if state == "done":
            if self.rank == 0:
                print(f"{self.out} already holds this dataset, complete; nothing to do (--overwrite to redo it)")
            return
        mine = todo[self.rank::self.world]  # a fresh run: chunk c -> rank c % world
        batches = [list(range(a, min(a + batch_size, self.end(c)))) for c in mine
                   for a in range(c * self.cs, self.end(c), batch_size)]
        rounds = max(sum(math.ceil((self.end(c) - c * self.cs) / batch_size) for c in todo[r::self.world])
                     for r in range(self.world))  # the same on every rank
        self.left = {c: self.end(c) - c * self.cs for c in mine}  # rows still to encode, per chunk
        loader = iter(DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                 worker_init_fn=plumbing.ignore_stop_signals)) if batches else None
        self.bar = tqdm(total=sum(self.left.values()), unit="img", disable=self.rank != 0,
                        desc=f"rank 0 of {self.world}")
        for r in range(rounds):  # a round: a batch on each rank (none where its share is done), then the stop check
            if r < len(batches):
                self.encode(*next(loader))
            if stop := plumbing.stop_requested(self.received, self.device):  # the same on every rank
                raise self.stopped(stop)
        self.bar.close()
        del loader  # its workers end here
        if self.rank == 0:  # every rank has written its chunks (each passed the last stop check after them)
            wait_for_chunks(self.out, [self.marker(c) for c in range(math.ceil(self.N / self.cs))],
                            self.copy_in_parts, self.received, self.stopped)
            write_meta(self.out, self.settings, self.latent_shape,
                       1.0 if self.vae is None else self.vae.config["scaling_factor"], class_names, files)

    def prepare(self, labels, overwrite):
        """Rank 0: what to do with `out` and which chunks are left (for every rank: one list, one owner each)."""
        state = check_out(self.out, self.settings, overwrite)
        if state == "done":
            return state, []
        if state == "new":
            create_files(self.out, self.arrays, labels, self.settings)
        else:  # chunk files a killed run was writing (no rank writes before this decision reaches it)
            plumbing.remove_stale_tmp(os.path.join(glob.escape(self.out), ".progress", "*"))
        try:
            self.mm.update({name: np.load(os.path.join(self.out, name), mmap_mode="r+") for name in self.arrays})
        except (OSError, ValueError) as e:
            raise SystemExit(f"--out {self.out}: cannot reopen the unfinished dataset ({e}); delete it, or choose "
                             f"another --out")
        n_chunks = math.ceil(self.N / self.cs)
        todo = [c for c in range(n_chunks) if not os.path.exists(self.marker(c)) and not os.path.exists(self.part(c))]
        if state == "resume" and overwrite:
            print(f"--overwrite: {self.out} holds this dataset unfinished, made with the same settings: resuming it "
                  f"({len(todo)} of {n_chunks} chunks left)")
        return state, todo

    def encode(self, idx, img, err):
        """One batch: (B,) indices (a contiguous range a:b), (B, R, R, 3) uint8 images, B error strings."""
        a, b = idx[0].item(), idx[-1].item() + 1
        c = a // self.cs
        lo, hi = a - c * self.cs, b - c * self.cs  # the batch's rows within its chunk
        if c not in self.rows:
            self.rows[c] = {name: np.zeros((self.end(c) - c * self.cs, *shape[1:]), dtype)
                            for name, (dtype, shape) in self.arrays.items()}
        ok = torch.tensor([e == "" for e in err])
        for i, e in zip(idx.tolist(), err):
            if e:
                self.bar.write(f"warning: cannot read image {self.files[i] if self.files else i}: {e} (marked "
                               f"invalid)", sys.stderr)
        lats = {name: encode_batch(self.vae, img.flip(2) if name == "latents_flip.npy" else img,  # flip along W
                                   self.settings["vae_precision"]).half()  # (B, 2, C, h, w), as kept
                for name in ("latents.npy", "latents_flip.npy") if name in self.arrays}
        for name, lat in lats.items():  # a NaN (an fp16 VAE's) or a value past float16's range: invalid too
            finite = torch.isfinite(lat).flatten(1).all(1)
            for i in idx[ok & ~finite].tolist():
                self.bar.write(f"warning: image {self.files[i] if self.files else i} encodes to a non-finite latent"
                               f"{' (flipped)' * (name == 'latents_flip.npy')} (marked invalid)", sys.stderr)
            ok &= finite
        for name, lat in lats.items():
            self.rows[c][name][lo:hi] = lat.masked_fill(~ok[:, None, None, None, None], 0).numpy()
        if "images.npy" in self.arrays:
            self.rows[c]["images.npy"][lo:hi] = img.numpy()
        self.rows[c]["valid.npy"][lo:hi] = ok.numpy()
        self.left[c] -= b - a
        if self.left[c] == 0:
            if self.rank == 0:
                self.copy_in(c, self.rows.pop(c))
                self.copy_in_parts()
            else:
                with plumbing.atomic_write(self.part(c)) as f:  # renamed into place complete: rank 0 may copy it
                    np.savez(f, **self.rows.pop(c))
        self.bar.update(b - a)

    def copy_in(self, c, rows):
        """Rank 0: chunk c's rows into the arrays; they reach the disk before its marker."""
        for name, arr in rows.items():
            self.mm[name][c * self.cs: c * self.cs + len(arr)] = arr
        for arr in self.mm.values():
            arr.flush()
        open(self.marker(c), "w").close()

    def copy_in_parts(self):
        """Rank 0: the chunks that other ranks have finished so far."""
        progress = os.path.join(self.out, ".progress")
        for f in sorted(os.listdir(progress)):
            if f.endswith(".npz"):  # (not an unfinished chunk_XXXXXX.npz.tmpPID)
                with np.load(os.path.join(progress, f)) as z:
                    self.copy_in(int(f[len("chunk_"):-len(".npz")]), {name: z[name] for name in self.arrays})
                os.remove(os.path.join(progress, f))

    def stopped(self, signum):
        return plumbing.stopped(signum, f"the finished chunks are kept in {self.out}/.progress")


def decided_by_rank0(rank, fn, *args):
    """fn(*args) run on rank 0 alone, its result on every rank (plumbing.from_rank0): what rank 0 sees of a shared
    filesystem decides for all, whose own views may lag. A SystemExit of fn (a refusal) reaches every rank and
    stops each with the same message, instead of leaving the others waiting at the next collective."""
    result = None
    if rank == 0:
        try:
            result = fn(*args)
        except SystemExit as e:
            result = e
    result = plumbing.from_rank0(result)
    if isinstance(result, SystemExit):
        raise result
    return result


def parse_args(argv=None):
    p = plumbing.ArgumentParser("Encode an image folder (or the toy set) into a nanoDDT dataset.")
    count = plumbing.number(int, 1)
    p.add_argument("--data-path", help="class-per-subfolder image tree (ImageNet train/ layout)")
    p.add_argument("--toy", action="store_true", help="write the built-in toy set (pixel space, 32 px, 5000 images)")
    p.add_argument("--split", choices=list(TOY_SPLITS), default="train",
                   help="with --toy: `val` writes the held-out split instead (1000 other seeded images)")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--vae", help="VAE for pretrained.load_vae (a diffusers AutoencoderKL folder or file), or 'none' "
                                 "for pixel space; required with --data-path, 'none' by default with --toy")
    p.add_argument("--vae-precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype of the VAE on GPU (always fp32 on the CPU)")
    p.add_argument("--resolution", type=count, help="center-crop size in pixels, a multiple of the VAE's "
                                                    "downsampling (default 256; 32 with --toy)")
    p.add_argument("--images", action="store_true", help="also store the cropped pixels (images.npy, for REPA; "
                                                         "~250 GB for ImageNet at 256 px); implied by --toy")
    p.add_argument("--flip", action="store_true", help="also encode the flipped images (latents_flip.npy); "
                                                       "off in the paper")
    p.add_argument("--batch-size", type=count, default=64, help="images per VAE call, per rank")
    p.add_argument("--chunk-size", type=count, default=1024, help="images per unit of work (and of resuming)")
    p.add_argument("--num-workers", type=plumbing.number(int, 0), default=min(8, os.cpu_count() or 1),
                   help="image-loading processes per rank (default: up to 8, at most the CPU count)")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset in --out if it was made with other "
                   "settings or is finished (an unfinished one with the same settings is resumed)")
    args = p.parse_args(argv)
    if args.toy == (args.data_path is not None):
        p.error("give exactly one of --data-path DIR and --toy")
    if args.split != "train" and not args.toy:
        p.error("--split is for --toy; for your own images, run prepare_latents.py on a folder of held-out images")
    if args.vae is None and not args.toy:
        p.error("--vae is required with --data-path (a VAE folder or file, or 'none' for pixel space)")
    args.vae = args.vae or "none"
    args.resolution = args.resolution if args.resolution is not None else (32 if args.toy else 256)
    plumbing.check_writable_dir("--out", args.out)
    return args


def vae_of(args, device):
    """The VAE of --vae (None for pixel space), with --resolution checked against its downsampling."""
    if args.vae == "none":
        return None
    try:
        vae = pretrained.load_vae(args.vae).to(device)
    except (OSError, ValueError) as e:  # missing or unfit VAE files: the message says which and why
        plumbing.refuse(f"--vae: {e}")
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    if args.resolution % factor:
        plumbing.refuse(f"--resolution {args.resolution}: the VAE downsamples by {factor}, so the images must be a "
                        f"multiple of {factor} pixels (e.g. {max(factor, args.resolution // factor * factor)})")
    return vae


def main(argv=None):
    args = parse_args(argv)
    rank, _, world_size, device = plumbing.setup_dist(tf32=args.vae_precision != "fp32")
    try:
        vae = vae_of(args, device)
        if args.toy:
            n_per_class, seed = TOY_SPLITS[args.split]
            images, labels, class_names = make_toy_images(n_per_class, args.resolution, seed)
            dataset, files, source = [(i, torch.from_numpy(im), "") for i, im in enumerate(images)], None, "toy"
            fingerprint = hashlib.sha1(images.tobytes()).hexdigest()
            args.images, args.num_workers = True, 0
        else:
            files, labels, class_names = decided_by_rank0(rank, list_images, args.data_path)
            dataset, source = ImageFiles(files, args.resolution), os.path.abspath(args.data_path)
            fingerprint = hashlib.sha1("\n".join(f"{f}\t{l}" for f, l in zip(files, labels)).encode()).hexdigest()
        precision = args.vae_precision if vae is not None and device.type == "cuda" else "fp32"
        settings = {"format_version": FORMAT_VERSION, "source": source, "count": len(labels),
                    "files_sha1": fingerprint, "vae": args.vae if vae is None else os.path.abspath(args.vae),
                    "vae_precision": precision, "resolution": args.resolution, "flip": args.flip,
                    "images": args.images, "chunk_size": args.chunk_size}
        with plumbing.stop_signals() as received:
            DatasetWriter(args.out, settings, vae, received, device).write(
                dataset, labels, class_names, files, args.batch_size, args.num_workers, args.overwrite)
    finally:
        plumbing.cleanup_dist()


if __name__ == "__main__":
    main()
