"""
Train a DDT (or its baseline, the improved DiT) with linear flow matching and REPA, as in the paper, from one CPU
process to many GPUs.

    python prepare_latents.py --toy --out data/toy                  # built-in toy set, pixel space
    python prepare_latents.py --toy --split val --out data/toy_val  # its held-out images
    python train.py --data data/toy --out-dir runs/toy --model DDT-Toy/4 --global-batch-size 64 --lr 2e-3 \\
        --max-steps 1500 --ckpt-every 250 --val-data data/toy_val
    python train.py --data data/toy --out-dir runs/toy --val-data data/toy_val --eval-only   # val loss of ckpt.pt
    torchrun --nproc_per_node=8 train.py --data data/in256 --out-dir runs/xl --dino dinov2_vitb14_pretrain.pth
    torchrun --nproc_per_node=8 train.py --data data/in256 --out-dir runs/idit-xl --model iDiT-XL/2 \\
        --dino dinov2_vitb14_pretrain.pth                           # the paper's baseline: DDT without a decoder

With --val-data, the validation loss (val_loss below: a deterministic flow-matching loss on held-out images) of
the raw and the EMA weights goes to the log every --val-every steps (default: at each checkpoint).

Rerunning the same command continues from OUT/ckpt.pt, bit-exactly on CPU (on GPUs up to the kernels that are
not deterministic): every random draw of step s (data order, t, noise, class dropout, flips) is seeded by
(seed, step), so the step number is the whole data/RNG state. The draws are made for the whole global batch and
each rank keeps its slice, so a step gives the same result, to float32 rounding, on any number of ranks and
--grad-accum (8 ranks = 1 = 2 x --grad-accum 4): a run may resume on another number of GPUs.

SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) stops the run after the step in progress (all ranks at the same step), writes
OUT/ckpt.pt and exits with status plumbing.EXIT_STOPPED (75); a second signal during that write changes nothing. One run
per folder: rank 0 holds an OS lock on OUT/train.lock while it runs (released by the OS if the process dies).
"""

import argparse
import copy
import glob
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from statistics import NormalDist

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import ddt
import plumbing
import pretrained
import sample

# -----------------------------------------------------------------------------------------------
# data: the memmapped dataset written by prepare_latents.py


def read_meta(data_dir, flag="--data"):
    """The dataset's meta.json, or a message naming the folder and what to do."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"{flag} {data_dir}: no meta.json there; make the dataset with prepare_latents.py "
                         f"(an interrupted prepare_latents run writes meta.json only when it finishes)")
    with open(meta_path) as f:
        return json.load(f)


def read_rows(array, rows):
    """array[rows] for distinct `rows`, read from the memmap in sorted order (faster on disk), kept in `rows`' order."""
    idx, back = np.unique(rows, return_inverse=True)
    return array[idx][back]


class LatentBatches:
    """Batch s of a rank: a fixed permutation of the valid rows per epoch (seeded by the epoch), cut into
    global batches; rank r takes the r-th contiguous slice of its step's global batch (`part`). Everything is a
    function of the step, and every draw is made for the whole global batch, so what an image sees (its flip
    here, its noise and time in flow_matching_inputs) does not depend on the number of ranks."""

    def __init__(self, data_dir, global_batch, rank, world, seed, need_images):
        self.meta = read_meta(data_dir)
        self.dir, self.batch, self.seed = data_dir, global_batch, seed
        self.part = slice(rank * global_batch // world, (rank + 1) * global_batch // world)  # this rank's share
        self.valid = np.flatnonzero(np.load(os.path.join(data_dir, "valid.npy")))
        self.steps_per_epoch = len(self.valid) // global_batch
        if self.steps_per_epoch == 0:
            raise SystemExit(f"--data {data_dir} has {len(self.valid)} valid images, fewer than one global batch "
                             f"({global_batch}); lower --global-batch-size")
        if need_images and not self.meta.get("has_images"):
            raise SystemExit(f"--dino needs the images for REPA, but --data {data_dir} has none: rerun "
                             f"prepare_latents.py with --images")
        self.need_images = need_images
        self.latents = self.flipped = self.images = None  # opened lazily, once per worker process
        self.epoch, self.order = None, None

    def open(self):
        if self.latents is None:
            self.latents = np.load(os.path.join(self.dir, "latents.npy"), mmap_mode="r")  # (N, 2, C, h, w)
            self.labels = np.load(os.path.join(self.dir, "labels.npy"))
            if self.meta.get("flip"):
                self.flipped = np.load(os.path.join(self.dir, "latents_flip.npy"), mmap_mode="r")
            if self.need_images:
                self.images = np.load(os.path.join(self.dir, "images.npy"), mmap_mode="r")  # (N, H, W, 3)

    def __call__(self, step):
        self.open()
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.valid)
        rows = self.order[i * self.batch:(i + 1) * self.batch][self.part]  # in the global batch's order
        lat = read_rows(self.latents, rows).astype(np.float32)  # (b, 2, C, h, w)
        out = {"y": torch.from_numpy(self.labels[rows])}
        flip = np.zeros(len(rows), bool)
        if self.flipped is not None:  # a random choice of the flipped copy, drawn for the whole global batch
            flip = (np.random.default_rng([self.seed, step, 1]).random(self.batch) < 0.5)[self.part]
            lat[flip] = read_rows(self.flipped, rows[flip]).astype(np.float32)
        out["mean"], out["std"] = torch.from_numpy(lat[:, 0]), torch.from_numpy(lat[:, 1])
        if self.images is not None:
            img = read_rows(self.images, rows)
            img = np.where(flip[:, None, None, None], img[:, :, ::-1], img)
            out["images"] = torch.from_numpy(np.ascontiguousarray(img)).permute(0, 3, 1, 2)  # (b, 3, H, W) uint8
        return out


class StepDataset(torch.utils.data.Dataset):
    """Item k is the batch of step start + k, so DataLoader workers prefetch the coming steps."""

    def __init__(self, batches, start, stop):
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, k):
        return self.batches(self.start + k)


# -----------------------------------------------------------------------------------------------
# validation loss: the flow-matching loss on held-out images, deterministic

# The time grid: the midpoint quantiles (k + 0.5) / 8 of training's t = sigmoid(randn), so that each time stands
# for an eighth of the training distribution: 0.177 0.292 0.380 0.461 0.539 0.620 0.708 0.823.
VAL_TIMES = tuple(1 / (1 + math.exp(-NormalDist().inv_cdf((k + 0.5) / 8))) for k in range(8))
VAL_CHUNK = 64  # images per forward pass, part of the definition: CPU matmuls round differently at other sizes
VAL_MUST_MATCH = ("latent_shape", "num_classes", "class_names", "vae", "scaling_factor")  # of train and val sets


class ValSet:
    """The held-out set of --val-data: its valid images in a fixed seeded order (the same for every run), the
    first `size` of them (all by default). It must be encoded like the training set `train_meta` (of `train_dir`)."""

    def __init__(self, val_dir, size, train_meta, train_dir):
        meta = read_meta(val_dir, "--val-data")
        diff = [f"{k} {train_meta.get(k)!r} vs {meta.get(k)!r}" for k in VAL_MUST_MATCH
                if train_meta.get(k) != meta.get(k)]
        if diff:
            raise SystemExit(f"--val-data {val_dir} does not match --data {train_dir}: {'; '.join(diff)}. Make the "
                             f"val set with prepare_latents.py from held-out images of the same classes, with the "
                             f"same --vae and --resolution")
        valid = np.flatnonzero(np.load(os.path.join(val_dir, "valid.npy")))
        order = np.random.default_rng(0).permutation(valid)  # seed 0, not --seed: every run scores the same images
        size = len(order) if size is None else size
        if not len(VAL_TIMES) <= size <= len(order):
            raise SystemExit(f"--val-size {size}: must be between {len(VAL_TIMES)} (one image per time of the grid) "
                             f"and the {len(order)} valid images of --val-data {val_dir}")
        self.rows = order[:size]
        self.latents = np.load(os.path.join(val_dir, "latents.npy"), mmap_mode="r")  # (N, 2, C, h, w)
        self.labels = np.load(os.path.join(val_dir, "labels.npy"))
        self.scale = meta["scaling_factor"]


@torch.no_grad()
def val_loss(model, val, device, autocast=nullcontext()):
    """The validation loss of `model` (a DDT or improved DiT) on `val` (a ValSet): {"loss": the mean over the
    times of VAL_TIMES of the per-time means, "loss_t": the per-time means}, as Python floats.

    Image j of the val order is taken at time t = VAL_TIMES[j % 8] (each time gets an eighth of the images),
    with its true class (no dropout), its posterior sample x = (mean + std * eps) * scale and its noise drawn
    from a generator seeded by (its row in the dataset, the time's index); the loss is training's
    |v(t x + (1 - t) noise, t, y) - (x - noise)|^2, mean over the latent, without the REPA term. The forward
    passes take fixed chunks of VAL_CHUNK images, chunk c on rank c % world, and one all-reduce collects
    the per-image losses (float64): the same number for any world size, whatever batch size the run trains
    with, bit-exact on the CPU. Under torchrun a collective: every rank calls it."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    T, n = len(VAL_TIMES), len(val.rows)
    losses = torch.zeros(n, dtype=torch.float64, device=device)
    for a in range(rank * VAL_CHUNK, n, world * VAL_CHUNK):
        j = np.arange(a, min(a + VAL_CHUNK, n))  # positions in the val order
        rows, k = val.rows[j], j % T
        lat = torch.from_numpy(val.latents[rows].astype(np.float32))  # (b, 2, C, h, w)
        gens = [torch.Generator().manual_seed(int(r) * 1_000_003 + int(i)) for r, i in zip(rows, k)]
        eps = torch.stack([torch.randn(lat.shape[2:], generator=g) for g in gens])  # each generator: eps first,
        noise = torch.stack([torch.randn(lat.shape[2:], generator=g) for g in gens])  # then the noise
        x = ((lat[:, 0] + lat[:, 1] * eps) * val.scale).to(device)  # (b, C, h, w) posterior sample
        noise = noise.to(device)
        t = torch.tensor([VAL_TIMES[i] for i in k], dtype=torch.float32, device=device)[:, None, None, None]
        with autocast:
            v = model(t * x + (1 - t) * noise, t.flatten(), torch.from_numpy(val.labels[rows]).to(device))[0]
        losses[torch.from_numpy(j).to(device)] = (v.float() - (x - noise)).pow(2).flatten(1).mean(1).double()
    if world > 1:
        dist.all_reduce(losses)  # every position is filled by one rank, zero elsewhere: an exact sum
    losses = losses.cpu()
    per_t = [losses[i::T].mean().item() for i in range(T)]
    return {"loss": sum(per_t) / T, "loss_t": per_t}


def val_record(step, raw_model, ema, val, device, autocast):
    """The log record of a validation: the raw and the EMA model's loss, their per-time means, the set's size."""
    t0 = time.time()
    raw_l, ema_l = (val_loss(m, val, device, autocast) for m in (raw_model, ema))
    return {"step": step, "val_loss": raw_l["loss"], "val_loss_ema": ema_l["loss"], "val_size": len(val.rows),
            "val_seconds": time.time() - t0, "val_loss_t": raw_l["loss_t"], "val_loss_ema_t": ema_l["loss_t"]}


def format_record(rec):
    """A log record as the printed line: `key value | ...`, numbers to 4 significant digits."""
    def fmt(v):
        if isinstance(v, list):
            return "[" + " ".join(map(fmt, v)) + "]"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return " | ".join(f"{k} {fmt(v)}" for k, v in rec.items())


# -----------------------------------------------------------------------------------------------
# model pieces used only for training


class Student(nn.Module):
    """The DDT plus the REPA projector, as one module so DDP and torch.compile see both."""

    def __init__(self, model, feature_dim, repa_layer):
        super().__init__()
        D = model.cfg.hidden_size
        self.model, self.repa_layer = model, repa_layer
        self.projector = None
        if feature_dim:  # Linear -> SiLU -> Linear -> SiLU -> Linear, as released
            self.projector = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D), nn.SiLU(),
                                           nn.Linear(D, feature_dim))

    def forward(self, x_t, t, y):
        if self.projector is None:
            return self.model(x_t, t, y)[0], None
        v, _, h = self.model(x_t, t, y, repa_layer=self.repa_layer)
        return v, self.projector(h)  # (B, C, H, W), (B, N, feature_dim)


def flops_per_image(cfg, H, W):
    """Forward matmul FLOPs of one image (2 per multiply-add); a training step costs 3x this."""
    D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    N, hid = (H // p) * (W // p), int(2 * cfg.mlp_ratio * D / 3)
    per_block = 2 * N * (4 * D * D + 3 * D * hid) + 4 * N * N * D  # qkv + proj + SwiGLU, attention
    enc = cfg.encoder_depth * (per_block + 2 * 6 * D * D)  # adaLN: one condition per image
    dec = cfg.decoder_depth * (per_block + 2 * N * 6 * D * D)  # adaLN: one condition per token
    # patch embeddings and the final layer's adaLN: DDT has two embeddings and modulates per token (by z), the
    # improved DiT has one and modulates per image (by c)
    embeddings, conditions = (2, N) if cfg.decoder_depth else (1, 1)
    ends = 2 * N * C * p * p * D * embeddings + 2 * 2 * D * D * conditions + 2 * N * D * C * p * p
    return enc + dec + ends


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU; None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_p, model_p = list(ema.parameters()), [p.float() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)


# -----------------------------------------------------------------------------------------------


def add_model_args(p, default):
    """--model PRESET and the flags that override its fields (train.py and bench.py)."""
    p.add_argument("--model", default=default, choices=list(ddt.PRESETS), metavar="PRESET",
                   help="one of " + ", ".join(ddt.PRESETS))
    for name in ("hidden-size", "num-heads", "encoder-depth", "decoder-depth", "patch-size"):
        p.add_argument(f"--{name}", type=int, help="override the preset's value")


def lock_out_dir(out_dir):
    """Rank 0's lock on OUT/train.lock (plumbing.lock_file), held while the returned file stays open. With the lock,
    the temporary files that a killed run's atomic writes left are removed."""
    os.makedirs(out_dir, exist_ok=True)
    f = plumbing.lock_file(os.path.join(out_dir, "train.lock"), "--out-dir", out_dir, "train.py")
    if f is not None:
        d = glob.escape(out_dir)  # the lock is ours: leftovers of train.py's own files are a killed run's (not a
        # sample.py's reading this folder, which writes its own)
        plumbing.remove_stale_tmp(os.path.join(d, "ckpt*.pt"), os.path.join(d, "log.jsonl"),
                             os.path.join(d, "samples", "*.png"))
    return f


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train DDT (flow matching + REPA). Defaults are the paper's, "
                                "except the EMA warm-up (--no-ema-warmup).", formatter_class=plumbing.HelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory from prepare_latents.py")
    p.add_argument("--out-dir", required=True, help="run directory: ckpt.pt, log.jsonl, samples/")
    add_model_args(p, default="DDT-XL/2")
    p.add_argument("--global-batch-size", type=int, default=256, help="images per optimizer step, all ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay of the sampling weights")
    p.add_argument("--no-ema-warmup", action="store_true",
                   help="plain decay from step 0 as in the paper (default: min(decay, (1+s)/(10+s)))")
    p.add_argument("--max-steps", type=int, help="default: 256 epochs of the dataset")
    p.add_argument("--seed", type=int, default=0, help="init, data order and every draw")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--log-every", type=int, default=100, help="steps per log line")
    p.add_argument("--ckpt-every", type=int, default=10000, help="steps between checkpoints (OUT/ckpt.pt)")
    p.add_argument("--keep-every", type=int, default=0, help="also keep ckpt_STEP.pt every this many steps")
    p.add_argument("--sample-every", type=int, default=10000, help="EMA sample grid every this many steps (0: off)")
    p.add_argument("--sample-steps", type=int, default=50, help="Euler steps for the sample grids")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max grad norm (0: off, as released)")
    p.add_argument("--dino", help="DINOv2 weights (dinov2_vitb14_pretrain.pth) to turn REPA on")
    p.add_argument("--repa-layer", type=int, default=8,
                   help="encoder block (1-based; of an improved DiT, any block) aligned to DINOv2")
    p.add_argument("--repa-weight", type=float, default=0.5, help="weight of the REPA loss")
    p.add_argument("--class-dropout", type=float, default=0.1, help="share of labels set to the null class")
    p.add_argument("--num-workers", type=int, default=2, help="data loader processes per rank")
    p.add_argument("--val-data", help="held-out dataset from prepare_latents.py (same VAE, resolution and classes "
                                      "as --data) for the validation loss")
    p.add_argument("--val-every", type=int, help="steps between validation losses (default: --ckpt-every; 0: off)")
    p.add_argument("--val-size", type=int, help="validate on the first this many images of the val set's fixed "
                                                "seeded order (default: all its valid images)")
    p.add_argument("--eval-only", action="store_true",
                   help="print the validation loss of OUT/ckpt.pt (needs --val-data) and exit, writing nothing")
    args = p.parse_args(argv)
    if args.eval_only and not args.val_data:
        p.error("--eval-only needs --val-data")
    if args.val_every is not None and args.val_every < 0:
        p.error("--val-every must be >= 0 (0 turns the validation loss off)")
    args.val_every = args.ckpt_every if args.val_every is None else args.val_every
    return args


def model_config(args, meta):
    """The preset with the flags' overrides, channels and classes from the dataset's meta, checked."""
    over = {k: getattr(args, k) for k in ("hidden_size", "num_heads", "encoder_depth", "decoder_depth", "patch_size")
            if getattr(args, k) is not None}
    cfg = replace(ddt.PRESETS[args.model], in_channels=meta["latent_shape"][0], num_classes=meta["num_classes"], **over)
    _, h, w = meta["latent_shape"]
    if h % cfg.patch_size or w % cfg.patch_size:
        raise SystemExit(f"--patch-size {cfg.patch_size} does not divide the data's {h}x{w} latents")
    if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
        raise SystemExit(f"--hidden-size {cfg.hidden_size} / --num-heads {cfg.num_heads} must give a head dim "
                         f"divisible by 4")
    return cfg


def autocast_for(args, device):
    """(precision, autocast context) of --precision: by default bf16 autocast on a GPU, fp32 on the CPU."""
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    return precision, precision_context(device, precision)


def precision_context(device, precision):
    """bf16 autocast on `device` for precision "bf16"; a disabled one (plain float32) otherwise."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def main(argv=None):
    """Train; returns the raw model. With --eval-only, prints the validation loss of OUT/ckpt.pt and returns its
    record. Everything lives in the call (process group, lock, signal handlers), so a study may call it again."""
    args = get_args(argv)
    meta = read_meta(args.data)  # a wrong --data (or --val-data) is reported before --out-dir is created
    val = (ValSet(args.val_data, args.val_size, meta, args.data)
           if args.val_data and (args.val_every or args.eval_only) else None)
    rank, local_rank, world, device = plumbing.setup_dist()
    lock = None
    try:
        if args.eval_only:
            return eval_only(args, val, rank, device)
        if rank == 0:
            lock = lock_out_dir(args.out_dir)
        with plumbing.stop_signals() as received:
            return train(args, val, rank, local_rank, world, device, received)
    finally:
        if lock is not None:
            lock.close()
        plumbing.cleanup_dist()


def eval_only(args, val, rank, device):
    """--eval-only: the validation loss of OUT/ckpt.pt, raw and EMA weights, printed by rank 0; writes nothing."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    try:
        ckpt = ddt.load_checkpoint(ckpt_path)
        raw_model, ema = (ddt.load_ddt(ckpt_path, ema=e, ckpt=ckpt).to(device) for e in (False, True))
    except (OSError, ValueError) as e:  # ddt.CheckpointError is a ValueError
        raise SystemExit(f"--eval-only: {e}") from None
    rec = val_record(ckpt["step"], raw_model, ema, val, device, autocast_for(args, device)[1])
    if rank == 0:
        print(format_record(rec), flush=True)
    return rec


def load_teacher(path, meta, cfg, device):
    """The DINOv2 teacher of --dino, checked to give as many tokens as the DDT has."""
    try:
        teacher = pretrained.load_dino(path).to(device)
    except (OSError, ValueError, NotImplementedError) as e:
        raise SystemExit(f"--dino: {e}") from None
    H, W = meta["resolution"], meta["resolution"]
    with torch.no_grad():
        n_teacher = teacher(torch.zeros(1, 3, H, W, device=device)).shape[1]
    n_student = (meta["latent_shape"][1] // cfg.patch_size) * (meta["latent_shape"][2] // cfg.patch_size)
    if n_teacher != n_student:
        raise SystemExit(f"REPA needs as many DINOv2 tokens as DDT tokens: {n_teacher} from {H} px images vs "
                         f"{n_student} from {meta['latent_shape'][1:]} latents at --patch-size {cfg.patch_size}")
    return teacher


def build(cfg, teacher, args, device):
    """(Student: the model and the REPA projector, the model's float32 EMA, AdamW), seeded by --seed."""
    torch.manual_seed(args.seed)
    model = ddt.DDT(cfg)
    student = Student(model, teacher.embed_dim if teacher else 0, args.repa_layer).to(device)
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=tuple(args.betas),
                            weight_decay=args.weight_decay, fused=device.type == "cuda")
    return student, ema, opt


def resume(ckpt_path, args, cfg, student, ema, opt):
    """Load OUT/ckpt.pt into the model, the REPA projector, the EMA and the optimizer after checking that it is
    this run's (data order, config, REPA); returns its step."""
    try:
        ckpt = ddt.load_checkpoint(ckpt_path)
    except ValueError as e:
        raise SystemExit(f"cannot resume: {e}\nMove {ckpt_path} away to start over, or copy a kept "
                         f"ckpt_STEP.pt (--keep-every) in its place.") from None
    order = {"global_batch_size": args.global_batch_size, "seed": args.seed}
    if ckpt.get("data_order", order) != order:
        raise SystemExit(f"{ckpt_path} was trained with {ckpt['data_order']}: resume with the same "
                         f"--global-batch-size and --seed, so that the data order continues")
    if ckpt["config"] != asdict(cfg):
        raise SystemExit(f"{ckpt_path} was trained with {ckpt['config']}, but the flags give {asdict(cfg)}; "
                         f"use the same model flags, or another --out-dir for a new run")
    if bool(ckpt.get("projector")) != (student.projector is not None):
        raise SystemExit(f"{ckpt_path} was trained {'with' if ckpt.get('projector') else 'without'} REPA; "
                         f"resume it {'with' if ckpt.get('projector') else 'without'} --dino")
    student.model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    if student.projector is not None:
        student.projector.load_state_dict(ckpt["projector"])
    opt_state = ckpt["optimizer"]
    for group in opt_state["param_groups"]:  # the flags win over the stored hyperparameters (e.g. a lower
        # --lr), and `fused` must be this device's before loading: it decides where the step counts go
        # (a CPU-saved state resumed on a GPU with fused AdamW needs them on the GPU)
        group.update(lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                     fused=opt.defaults["fused"])
    opt.load_state_dict(opt_state)
    return ckpt["step"]


def truncate_log(log_path, step):
    """Drop the lines of log.jsonl after `step` (those steps are redone) and any line torn by a crash."""
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
    with plumbing.atomic_write(log_path, "w") as f:
        f.writelines(kept)


def flow_matching_inputs(batch, gen, part, global_batch, scale, class_dropout, num_classes, device):
    """A step's linear flow-matching problem: x_t = t x + (1 - t) noise for a posterior sample x, t = sigmoid(randn),
    labels dropped to the null class with p = class_dropout; (x_t, t, y, x - noise). Every draw comes from `gen`
    (seeded by the step) for the whole global batch, of which this rank keeps its slice `part`: image j of the
    global batch gets the same draws however the batch is split over ranks and micro-steps."""
    mean, std, y = (batch[k].to(device, non_blocking=True) for k in ("mean", "std", "y"))
    shape = (global_batch, *mean.shape[1:])
    x = (mean + std * torch.randn(shape, generator=gen, device=device)[part]) * scale  # posterior sample
    noise = torch.randn(shape, generator=gen, device=device)[part]
    t = torch.sigmoid(torch.randn(global_batch, generator=gen, device=device)[part])  # lognorm t
    drop = torch.rand(global_batch, generator=gen, device=device)[part] < class_dropout
    y = torch.where(drop, num_classes, y)  # null class for classifier-free guidance
    x_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise
    return x_t, t, y, x - noise


def accumulate_gradients(model, x_t, t, y, target, feats, args, sums, world, autocast):
    """Forward and backward of one optimizer step in args.grad_accum micro-steps (DDP syncs the gradients on the
    last one); adds the flow-matching and REPA losses to sums[:2]; returns the last micro-step's loss."""
    micro = len(x_t) // args.grad_accum
    for k in range(args.grad_accum):
        part = slice(k * micro, (k + 1) * micro)
        sync = k == args.grad_accum - 1 or world == 1
        try:
            with (model.no_sync() if not sync else torch.enable_grad()), autocast:
                v, proj = model(x_t[part], t[part], y[part])
                fm = F.mse_loss(v.float(), target[part])
                repa = torch.zeros((), device=x_t.device)
                if proj is not None:
                    repa = (1 - F.cosine_similarity(proj.float(), feats[part].float(), dim=-1)).mean()
                loss = fm + args.repa_weight * repa
            (loss / args.grad_accum).backward()
        except torch._dynamo.exc.BackendCompilerFailed as e:  # --compile only: inductor could not build its code
            raise SystemExit(f"--compile: torch.compile cannot compile the model on this machine "
                             f"({str(e).strip().splitlines()[0]}); run without --compile") from None
        sums[:2] += torch.stack([fm.detach(), repa.detach()]) / args.grad_accum
    return loss


def save_checkpoint(args, step, student, ema, opt, cfg, meta):
    """OUT/ckpt.pt (and ckpt_STEP.pt every --keep-every steps), plain data, written atomically."""
    ckpt = {"model": student.model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "projector": student.projector.state_dict() if student.projector is not None else {},
            "step": step, "config": asdict(cfg), "args": vars(args) | {"betas": list(args.betas)},
            "data_order": {"global_batch_size": args.global_batch_size, "seed": args.seed},
            "data": {k: meta[k] for k in ("scaling_factor", "vae", "latent_shape", "resolution",
                                           "num_classes", "class_names")}}
    plumbing.save_atomic(ckpt, os.path.join(args.out_dir, "ckpt.pt"))
    if args.keep_every and step % args.keep_every == 0:
        plumbing.save_atomic(ckpt, os.path.join(args.out_dir, f"ckpt_{step:07d}.pt"))


def grid_decoder(args, meta, device):
    """The VAE that decodes the sample grids of a latent dataset (its own, if it is still there), else None."""
    if not args.sample_every or meta["vae"] == "none":
        return None
    if not os.path.exists(meta["vae"]):
        print(f"sample grids off: the dataset's VAE {meta['vae']} is not there any more")
        args.sample_every = 0
        return None
    return pretrained.load_vae(meta["vae"]).to(device)


def train_record(step, means, steps_per_s, args, lr, seconds_left, device):
    """The log record of the steps since the last one: `means` (flow-matching loss, REPA loss, grad norm)."""
    fm, repa, grad_norm = means
    rec = {"step": step, "loss": fm + args.repa_weight * repa, "fm": fm, "repa": repa, "grad_norm": grad_norm,
           "lr": lr, "steps_per_s": steps_per_s, "images_per_s": steps_per_s * args.global_batch_size,
           "time_left": duration(seconds_left)}
    if device.type == "cuda":
        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return rec


def duration(seconds):
    """'1h05m', '7m12s' or '42s'."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def train(args, val, rank, local_rank, world, device, received):
    """The run of main(); `val` is the ValSet of --val-data (None: no validation loss), `received` gets the stop
    signals (plumbing.stop_signals)."""
    master = rank == 0
    if args.global_batch_size % (world * args.grad_accum):
        raise SystemExit(f"--global-batch-size {args.global_batch_size} must divide by ranks x --grad-accum "
                         f"= {world * args.grad_accum}")
    micro = args.global_batch_size // (world * args.grad_accum)
    precision, autocast = autocast_for(args, device)

    batches = LatentBatches(args.data, args.global_batch_size, rank, world, args.seed, need_images=bool(args.dino))
    meta = batches.meta
    cfg = model_config(args, meta)
    max_steps = args.max_steps or 256 * batches.steps_per_epoch
    if args.dino and not 1 <= args.repa_layer <= cfg.encoder_depth:
        raise SystemExit(f"--repa-layer {args.repa_layer} must be in 1..{cfg.encoder_depth} (the encoder depth"
                         f"{'' if cfg.decoder_depth else ': all the blocks of an improved DiT'})")

    teacher = load_teacher(args.dino, meta, cfg, device) if args.dino else None

    student, ema, opt = build(cfg, teacher, args, device)
    raw_model = student.model  # unwrapped, for saving, the EMA and sampling

    ckpt_path, step = os.path.join(args.out_dir, "ckpt.pt"), 0
    if os.path.exists(ckpt_path):
        step = resume(ckpt_path, args, cfg, student, ema, opt)
        if master:
            print(f"resumed {ckpt_path} at step {step}")
    if master:
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
        truncate_log(os.path.join(args.out_dir, "log.jsonl"), step)
    if world > 1:  # every rank must have resumed from the same step (a node-local --out-dir would not)
        steps = torch.tensor([step, -step], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0].item() != -steps[1].item():
            raise SystemExit(f"ranks resumed from different steps ({-steps[1].item()} to {steps[0].item()}): "
                             f"--out-dir {args.out_dir} must be one folder that all nodes share")
    if step > max_steps:
        raise SystemExit(f"{ckpt_path} is at step {step}, past --max-steps {max_steps}; raise --max-steps to "
                         f"train on, or use another --out-dir")

    model = student
    if world > 1:  # grads live in the all-reduce buckets (kept across steps: zero_grad(set_to_none=False))
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if args.compile:  # compiling the DDP module lets dynamo split the graph at buckets: all-reduce overlaps
        model = torch.compile(model)
    params = list(student.parameters())

    if master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{n_params / 1e6:.1f}M parameters, {asdict(cfg)}\n{world} rank(s) x {args.grad_accum} micro-step(s) "
              f"x {micro} images, {precision}, {len(batches.valid)} images, steps {step} -> {max_steps}"
              + (f", validation on {len(val.rows)} images every {args.val_every} steps" if val else ""))
    loader = torch.utils.data.DataLoader(StepDataset(batches, step, max_steps), batch_size=None, shuffle=False,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False, prefetch_factor=4 if args.num_workers else None,
                                         worker_init_fn=plumbing.ignore_stop_signals)
    scale = meta["scaling_factor"]
    grid_vae = grid_decoder(args, meta, device) if master else None

    def log(rec):  # rank 0: a line on stdout and in log.jsonl
        if master:
            print(format_record(rec), flush=True)
            with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    img_flops = 3 * flops_per_image(cfg, *meta["latent_shape"][1:])
    peak = peak_flops(device)
    sums = torch.zeros(3, device=device)  # fm loss, repa loss, grad norm, summed over the log interval
    t0, t_step0, t_wall = time.time(), step, time.time()  # t0 counts training only, t_wall everything

    for batch in loader:
        # one optimizer step of args.grad_accum micro-steps; all draws seeded by (seed, step), made for the whole
        # global batch: the step's result does not depend on how the batch is split
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step)
        x_t, t, y, target = flow_matching_inputs(batch, gen, batches.part, args.global_batch_size, scale,
                                                 args.class_dropout, cfg.num_classes, device)
        feats = None
        if teacher is not None:
            with torch.no_grad(), autocast:
                feats = teacher(batch["images"].to(device, non_blocking=True).float() / 255)  # (B, N, 768)
        loss = accumulate_gradients(model, x_t, t, y, target, feats, args, sums, world, autocast)
        grad_norm = nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):  # the gradients are all-reduced, so every rank stops here together
            raise SystemExit(f"non-finite loss or gradient at step {step + 1} (loss {loss.item():.4g}); stopped "
                             f"before the update. {ckpt_path} keeps the last good state. Check the data, lower "
                             f"--lr, or try --precision fp32.")
        sums[2] += grad_norm
        opt.step()
        opt.zero_grad(set_to_none=world == 1)
        step += 1
        decay = args.ema_decay if args.no_ema_warmup else min(args.ema_decay, (1 + step) / (10 + step))
        update_ema(ema, raw_model, decay)

        if step % args.log_every == 0 or step == max_steps:
            if world > 1:
                dist.all_reduce(sums)
            n = step - t_step0
            rec = train_record(step, (sums / (n * world)).tolist(), n / (time.time() - t0), args,
                               opt.param_groups[0]["lr"], (max_steps - step) * (time.time() - t_wall) / n, device)
            if peak:
                rec["mfu"] = rec["images_per_s"] / world * img_flops / peak
            log(rec)
            sums.zero_()
            t0, t_step0, t_wall = time.time(), step, time.time()
        # the validation loss before the checkpoint: one lost to a crash in between is redone with the steps
        if val is not None and (step % args.val_every == 0 or step == max_steps):
            rec = val_record(step, raw_model, ema, val, device, autocast)
            log(rec)
            t0 += rec["val_seconds"]  # steps/s and images/s count training only
        saved = step % args.ckpt_every == 0 or step == max_steps or bool(args.keep_every
                                                                          and step % args.keep_every == 0)
        if master and saved:
            save_checkpoint(args, step, student, ema, opt, cfg, meta)
        if master and args.sample_every and (step % args.sample_every == 0 or step == max_steps):
            write_grid(ema, grid_vae, meta, args, device, os.path.join(args.out_dir, "samples", f"{step:07d}.png"))
        stop = plumbing.stop_requested(received, device) if step < max_steps else 0  # the same on every rank
        if master and stop and not saved:
            save_checkpoint(args, step, student, ema, opt, cfg, meta)
        if world > 1 and (step % args.ckpt_every == 0 or step == max_steps or stop):
            dist.barrier()  # no rank runs ahead of (or exits before) a checkpoint being written
        if stop:
            if master:
                print(f"stopped by {signal.Signals(stop).name} at step {step}: rerun the same command to resume",
                      flush=True)
            raise SystemExit(plumbing.EXIT_STOPPED)
    return raw_model


def write_grid(ema, vae, meta, args, device, path):
    """An EMA sample grid, 8 samples for each of (at most) 10 classes, so progress can be seen."""
    K = meta["num_classes"]
    labels = [c for c in list(range(0, K, max(1, K // 10)))[:10] for _ in range(8)]
    noise = sample.sample_noise(args.seed, range(len(labels)), meta["latent_shape"]).to(device)
    x = sample.euler_sample(ema, noise, torch.tensor(labels, device=device), num_steps=args.sample_steps)
    if vae is not None:
        with torch.no_grad():  # in chunks: a full-size fp32 decode of all 80 at once would spike rank 0's memory
            x = torch.cat([vae.decode(part / meta["scaling_factor"]) for part in x.split(16)])
    sample.save_grid(path, sample.to_uint8(x), labels, meta.get("class_names"))


if __name__ == "__main__":
    main()
