"""
Train a DDT (or its baseline, the improved DiT) with linear flow matching and REPA, as in the paper, from one CPU
process to many GPUs (torchrun); the README has the commands. In the order of this file: the data (LatentBatches),
a step's inputs, x = mean + std * eps from the VAE posterior, noise, t = sigmoid(randn), labels dropped to the
null class (step_inputs); the loss, flow matching plus REPA (training_loss); the step, its gradients in
--grad-accum micro-steps and AdamW (train_step); the EMA and the loop (train). A step's draws are seeded by
(--seed, step), the data order by (--seed, epoch), each made for the whole global batch, of which a rank keeps its
slice: a step does not depend on the number of ranks or micro-steps, and rerunning the command resumes exactly
(bit for bit on the CPU; on a GPU up to its kernels' nondeterminism).
What keeps a run safe (one run per folder, stop signals, resume checks) is below the loop and in plumbing.py.
"""

import argparse
import copy
import os
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import ddt
import evaluate
import plumbing
import prepare_latents
import pretrained
import sample

# -----------------------------------------------------------------------------------------------
# data: the memmapped dataset written by prepare_latents.py


class LatentBatches(torch.utils.data.Dataset):
    """Item s: this rank's batch of step s. A fixed permutation of the valid rows per epoch (seeded by the epoch),
    cut into global batches; rank r takes the r-th contiguous slice (`part`) of its step's global batch. A function
    of the step alone, so a resumed run reads what an uninterrupted one would."""

    def __init__(self, data_dir, global_batch, rank, world, seed, need_images):
        self.meta = prepare_latents.read_meta(data_dir)
        self.dir, self.batch, self.seed, self.need_images = data_dir, global_batch, seed, need_images
        self.part = slice(rank * global_batch // world, (rank + 1) * global_batch // world)  # this rank's share
        self.valid = np.flatnonzero(np.load(os.path.join(data_dir, "valid.npy")))
        self.steps_per_epoch = len(self.valid) // global_batch
        if self.steps_per_epoch == 0:
            plumbing.refuse(f"--data {data_dir} has {len(self.valid)} valid images, fewer than one global batch "
                            f"({global_batch}); lower --global-batch-size")
        if need_images and not self.meta.get("has_images"):
            plumbing.refuse(f"--dino needs the images for REPA, but --data {data_dir} has none: rerun "
                            f"prepare_latents.py with --images")
        self.latents = self.flipped = self.images = None  # opened lazily, once per worker process
        self.epoch, self.order = None, None

    def __getitem__(self, step):
        self.open()
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.valid)
        rows = self.order[i * self.batch:(i + 1) * self.batch][self.part]  # in the global batch's order
        lat = read_rows(self.latents, rows).astype(np.float32)  # (b, 2, C, h, w): posterior mean and std
        flip = np.zeros(len(rows), bool)
        if self.flipped is not None:  # the flipped copy for a random half, drawn for the whole global batch
            flip = (np.random.default_rng([self.seed, step, 1]).random(self.batch) < 0.5)[self.part]
            lat[flip] = read_rows(self.flipped, rows[flip]).astype(np.float32)
        out = {"y": torch.from_numpy(self.labels[rows]), "mean": torch.from_numpy(lat[:, 0]),
               "std": torch.from_numpy(lat[:, 1])}
        if self.images is not None:  # uint8 (b, 3, H, W), for REPA's teacher
            img = read_rows(self.images, rows)
            img[flip] = img[flip, :, ::-1]
            out["images"] = torch.from_numpy(img).permute(0, 3, 1, 2)
        return out

    def open(self):
        if self.latents is None:
            self.latents = np.load(os.path.join(self.dir, "latents.npy"), mmap_mode="r")  # (N, 2, C, h, w)
            self.labels = np.load(os.path.join(self.dir, "labels.npy"))
            if self.meta.get("flip"):
                self.flipped = np.load(os.path.join(self.dir, "latents_flip.npy"), mmap_mode="r")
            if self.need_images:
                self.images = np.load(os.path.join(self.dir, "images.npy"), mmap_mode="r")  # (N, H, W, 3)


def read_rows(array, rows):
    """array[rows], read from the memmap in sorted order (faster on disk), returned in `rows`' order."""
    idx, back = np.unique(rows, return_inverse=True)
    return array[idx][back]


# -----------------------------------------------------------------------------------------------
# a step's inputs, and the loss: linear flow matching + REPA


def step_inputs(batch, step, data, teacher, args, device):
    """This rank's share of step `step`: (x, y, noise, t, feats). x = (mean + std * eps) * scale is a fresh
    sample of each image's VAE posterior, y its label or, with p = --class-dropout, the null class (for
    guidance), t = sigmoid(randn) (logit-normal, as released), feats the teacher's features (REPA) or None.
    Every draw is made for the whole global batch and sliced, so image j of the global batch gets the same
    draws however the batch is split over ranks and micro-steps."""
    gen = torch.Generator(device).manual_seed(plumbing.mix_seed(args.seed, step))
    n, shape = args.global_batch_size, data.meta["latent_shape"]
    eps, noise = (torch.randn((n, *shape), generator=gen, device=device)[data.part] for _ in range(2))
    t = torch.sigmoid(torch.randn(n, generator=gen, device=device)[data.part])
    drop = torch.rand(n, generator=gen, device=device)[data.part] < args.class_dropout
    mean, std, y = (batch[k].to(device, non_blocking=True) for k in ("mean", "std", "y"))
    x = (mean + std * eps) * data.meta["scaling_factor"]  # (b, C, h, w)
    y = torch.where(drop, data.meta["num_classes"], y)  # the null class is index num_classes
    feats = None
    if teacher is not None:
        with torch.no_grad(), plumbing.autocast(device, args.precision):
            feats = teacher(batch["images"].to(device, non_blocking=True).float() / 255)  # (b, N, F)
    return x, y, noise, t, feats


class ModelWithProjector(nn.Module):
    """The DDT and REPA's projector (an MLP from the tokens of encoder block repa_layer to the teacher's width),
    one module so that DDP and torch.compile see both: (x_t, t, y) -> (v, projected tokens (B, N, F) or None)."""

    def __init__(self, model, feature_dim, repa_layer):
        super().__init__()
        self.model, self.repa_layer, self.projector, D = model, repa_layer, None, model.cfg.hidden_size
        if feature_dim:  # Linear -> SiLU -> Linear -> SiLU -> Linear, as released
            self.projector = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D), nn.SiLU(),
                                           nn.Linear(D, feature_dim))

    def forward(self, x_t, t, y):
        v, _, h = self.model(x_t, t, y, repa_layer=self.repa_layer if self.projector is not None else None)
        return v, None if self.projector is None else self.projector(h)


def training_loss(model, x, y, noise, t, feats, repa_weight):
    """The paper's loss on clean latents x (B, C, H, W), labels y (B,), noise like x, times t (B,) and the teacher's
    features feats (B, N, F) of the clean images (None: no REPA). Returns (loss, fm, repa), the parts detached."""
    t_ = t[:, None, None, None]
    x_t = t_ * x + (1 - t_) * noise  # (B, C, H, W), on the line from noise (t = 0) to data (t = 1)
    v, proj = model(x_t, t, y)  # the predicted velocity, encoder block repa_layer's tokens projected
    fm = F.mse_loss(v.float(), x - noise)  # flow matching: the line's velocity dx_t/dt = x - noise
    repa = torch.zeros((), device=x.device)
    if proj is not None:  # REPA: each token's projection points where the teacher's feature of its patch does
        repa = (1 - F.cosine_similarity(proj.float(), feats.float(), dim=-1)).mean()
    return fm + repa_weight * repa, fm.detach(), repa.detach()


# -----------------------------------------------------------------------------------------------
# the step


def train_step(model, opt, inputs, args):
    """One optimizer step on this rank's inputs (step_inputs): the loss and its gradients in --grad-accum
    micro-steps (under DDP, all-reduced in the last one only), the gradient norm (and a clip to --grad-clip), and
    AdamW, which skips its update where the norm is not finite: no weight ever takes a non-finite step, and no
    host sync waits for the check. Returns the mean loss, fm and REPA losses and the gradient norm, on the device."""
    x, y, noise, t, feats = inputs
    m, parts = len(x) // args.grad_accum, torch.zeros(3, device=x.device)
    for k in range(args.grad_accum):
        micro = slice(k * m, (k + 1) * m)
        sync = k == args.grad_accum - 1 or not hasattr(model, "no_sync")  # DDP: all-reduce in the last one only
        with (nullcontext() if sync else model.no_sync()), plumbing.compile_errors():
            with plumbing.autocast(x.device, args.precision):
                loss, fm, repa = training_loss(model, x[micro], y[micro], noise[micro], t[micro],
                                               None if feats is None else feats[micro], args.repa_weight)
            (loss / args.grad_accum).backward()
        parts += torch.stack([loss.detach(), fm, repa]) / args.grad_accum
    params = [p for group in opt.param_groups for p in group["params"]]
    grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # reads the grads once
    if args.grad_clip > 0:
        nn.utils.clip_grads_with_norm_(params, args.grad_clip, grad_norm)
    opt.found_inf = (~torch.isfinite(grad_norm)).float()  # fused AdamW: no update where 1 (grads are all-reduced:
    opt.step()  # every rank skips alike)
    opt.zero_grad(set_to_none=not hasattr(model, "no_sync"))  # DDP: grads stay in its buckets
    return torch.cat([parts, grad_norm[None]])  # loss, fm, repa, grad_norm


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_p, model_p = list(ema.parameters()), [p.float() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)


def ema_decay(args, step):
    """--ema-decay, with a warm-up min(decay, (1 + s) / (10 + s)) unless --no-ema-warmup (the paper's plain decay)."""
    return args.ema_decay if args.no_ema_warmup else min(args.ema_decay, (1 + step) / (10 + step))


# -----------------------------------------------------------------------------------------------
# the loop


def train(args, data, cfg, nets, val, device, received):
    """The run of main(): resume OUT/ckpt.pt if there is one, train to --max-steps. `data`: the LatentBatches,
    `cfg` the model's DDTConfig, `nets` the frozen networks (REPA's "teacher", the grids' "vae"; None where off or
    in pixel space), `val` the evaluate.ValSet of --val-data (None: no validation loss), `received` gets the stop
    signals (plumbing.stop_signals)."""
    teacher = nets["teacher"]
    rank, world = plumbing.rank_world()
    meta = data.meta
    student, ema, opt = build(cfg, teacher, args, device)
    step = resume_or_start(args, student, ema, opt, device)
    raw_model, model = student.model, student  # raw: unwrapped, for the EMA update and the validation loss
    if world > 1:  # grads live in the all-reduce buckets (kept across steps: zero_grad(set_to_none=False))
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if args.compile:  # compiling the DDP module lets dynamo split the graph at buckets: all-reduce overlaps
        model = torch.compile(model)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(step, args.max_steps),  # workers
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",  # prefetch
                                         prefetch_factor=4 if args.num_workers else None,  # the coming steps
                                         worker_init_fn=plumbing.ignore_stop_signals)
    log = plumbing.RunLog(os.path.join(args.out_dir, "log.jsonl"), step, args.max_steps)
    sums = torch.zeros(4, device=device)  # loss, fm, repa, grad_norm, summed over the steps since the last line
    log.print(describe_run(args, cfg, raw_model, data, val, step))
    flops = training_flops(student, teacher, meta)  # a training image, for MFU

    stop, writer = 0, plumbing.CheckpointWriter()
    for batch in loader:
        inputs = step_inputs(batch, step, data, teacher, args, device)
        sums += train_step(model, opt, inputs, args)
        step += 1
        update_ema(ema, raw_model, ema_decay(args, step))

        end = step == args.max_steps
        logged = every(args.log_every, step) or end
        saved = every(args.ckpt_every, step) or every(args.keep_every, step) or end
        if logged or saved or every(SYNC_EVERY, step):  # the loop's only host syncs: no step waits for the last
            plumbing.check_finite(sums, log.since, step, args)  # no line, no checkpoint after a skipped update
            stop = plumbing.stop_requested(received if not end else [], device)
        if logged:  # the means since the last line, speed, MFU, time left
            rec = log.steps(step, sums, ("loss", "fm", "repa", "grad_norm"), args.global_batch_size, flops)
            log.write(rec | {"lr": opt.param_groups[0]["lr"]})
        if val is not None and (every(args.val_every, step) or end):  # before the checkpoint: a val loss lost to
            val_rec = evaluate.val_record(step, raw_model, ema, val, device, args.precision)  # a crash is redone
            log.write(val_rec)
            log.pause(val_rec["val_seconds"])  # speed counts training only
        if rank == 0 and (saved or stop):  # a CPU copy, written to disk in the background
            keep = [f"{args.out_dir}/ckpt_{step:07d}.pt"] if every(args.keep_every, step) else []
            writer.save(checkpoint(args, step, student, ema, opt, meta), [f"{args.out_dir}/ckpt.pt", *keep])
        if args.sample_every and (every(args.sample_every, step) or end):  # every rank samples a share
            path = os.path.join(args.out_dir, "samples", f"{step:07d}.png")
            sample.class_grid(ema, nets["vae"], meta, path, args.seed, args.sample_steps, args.precision)
        if stop:
            plumbing.stop_run(stop, step, writer)
    writer.join()
    return raw_model


def main(argv=None):
    """Train; returns the raw model. With --eval-only, prints the validation loss of OUT/ckpt.pt and returns its
    record. Everything lives in the call (process group, lock, signal handlers), so a study may call it again.
    What can be refused (the flags, the data, the model's flags, the frozen networks) is, before --out-dir is
    touched; --init-from's weights are checked against the model once it is built."""
    args = get_args(argv)
    meta = prepare_latents.read_meta(args.data)
    val = (evaluate.ValSet(args.val_data, args.val_size, meta, args.data)
           if args.val_data and (args.val_every or args.eval_only) else None)
    if not args.eval_only:
        plumbing.check_writable_dir("--out-dir", args.out_dir)
    rank, _, world, device = plumbing.setup_dist(tf32=args.precision != "fp32")  # the default on a GPU: bf16
    plumbing.device_defaults(args, device)
    lock = None
    try:
        if args.global_batch_size % (world * args.grad_accum):
            plumbing.refuse(f"--global-batch-size {args.global_batch_size} must divide by ranks x --grad-accum = "
                            f"{world * args.grad_accum}")
        if args.eval_only:  # the val loss of OUT/ckpt.pt, printed; nothing written
            return evaluate.checkpoint_val_loss(os.path.join(args.out_dir, "ckpt.pt"), val, device, args.precision)
        data = LatentBatches(args.data, args.global_batch_size, rank, world, args.seed, need_images=bool(args.dino))
        cfg = model_config(args, meta)
        args.max_steps = args.max_steps or 256 * data.steps_per_epoch  # the paper: 256 epochs
        tokens = (meta["latent_shape"][1] // cfg.patch_size) * (meta["latent_shape"][2] // cfg.patch_size)
        nets = {"teacher": pretrained.load_teacher(args.dino, meta["resolution"], tokens, device) if args.dino
                else None, "vae": pretrained.dataset_vae(meta, device) if args.sample_every else None}
        if rank == 0:
            lock = plumbing.lock_run_dir(args.out_dir, "train.py", ("ckpt*.pt", "log.jsonl", "samples/*.png"))
        with plumbing.stop_signals() as received:
            return train(args, data, cfg, nets, val, device, received)
    finally:
        if lock is not None:
            plumbing.unlock(lock)
        plumbing.cleanup_dist()


# -----------------------------------------------------------------------------------------------
# helpers of the loop: the steps of its events, the checkpoint record

SYNC_EVERY = 10  # steps: the loop reads the device (a non-finite step, a stop signal) at least this often


def every(n, step):
    """Whether an --X-every n event falls on `step`: every n steps, never for n = 0."""
    return n > 0 and step % n == 0


def checkpoint(args, step, student, ema, opt, meta):
    """The run's state as plain data: weights, EMA, AdamW, REPA projector, step, config, flags, data description."""
    return {"model": student.model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "projector": student.projector.state_dict() if student.projector is not None else {}, "step": step,
            "config": asdict(student.model.cfg), "args": vars(args) | {"betas": list(args.betas)},
            "data_order": {"global_batch_size": args.global_batch_size, "seed": args.seed},
            "repa": student.projector is not None, "data": {k: meta[k] for k in (
                "scaling_factor", "vae", "latent_shape", "resolution", "num_classes", "class_names")}}


# -----------------------------------------------------------------------------------------------
# set-up: arguments, the model, resuming


def get_args(argv=None):
    p = plumbing.ArgumentParser("Train DDT (flow matching + REPA). Defaults are the paper's, except the EMA "
                                "warm-up (--no-ema-warmup). Every --*-every flag: 0 turns it off.")
    count, every_n, share, positive = (plumbing.number(int, 1), plumbing.number(int, 0), plumbing.number(float, 0, 1),
                                       plumbing.number(float, 0))
    add = p.add_argument
    add("--data", required=True, help="dataset directory from prepare_latents.py")
    add("--out-dir", required=True, help="run directory: ckpt.pt, log.jsonl, samples/")
    add_model_args(p, default="DDT-XL/2")
    add("--global-batch-size", type=count, default=256, help="images per optimizer step, all ranks")
    add("--grad-accum", type=count, default=1, help="micro-steps per optimizer step")
    add("--lr", type=positive, default=1e-4, help="AdamW learning rate (constant)")
    add("--betas", type=plumbing.number(float, 0, 1, open_hi=True), nargs=2, default=(0.9, 0.95), help="AdamW betas")
    add("--weight-decay", type=positive, default=0.0, help="AdamW weight decay")
    add("--ema-decay", type=share, default=0.9999, help="EMA decay of the sampling weights")
    add("--no-ema-warmup", action="store_true", help="plain decay from step 0 as in the paper (default: min(decay, "
                                                     "(1+s)/(10+s)))")
    add("--max-steps", type=count, help="default: 256 epochs of the dataset")
    add("--init-from", metavar="CKPT", help="start from CKPT's EMA weights (a run's ckpt.pt, or a released "
                                            "checkpoint with --model): fine-tuning, at another resolution or classes")
    add("--grad-checkpoint", action="store_true", help="recompute the blocks' activations in the backward pass")
    add("--allow-pickle", action="store_true", help="trust an --init-from checkpoint that needs pickle")
    add("--seed", type=plumbing.number(int, 0), default=0, help="init, data order and every draw")
    add("--precision", choices=("bf16", "fp32"), help="default: bf16 autocast on a GPU, fp32 on the CPU")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on a GPU)")
    add("--log-every", type=every_n, default=100, help="steps per log line (and the last step)")
    add("--ckpt-every", type=every_n, default=10000, help="steps per checkpoint OUT/ckpt.pt (and the last step)")
    add("--keep-every", type=every_n, default=0, help="also keep ckpt_STEP.pt every this many steps")
    add("--sample-every", type=every_n, default=10000, help="steps per EMA sample grid OUT/samples/STEP.png")
    add("--sample-steps", type=count, default=50, help="Euler steps for the sample grids")
    add("--grad-clip", type=positive, default=0.0, help="max grad norm (0: off, as released)")
    add("--dino", help="DINOv2 weights (dinov2_vitb14_pretrain.pth) to turn REPA on")
    add("--repa-layer", type=count, default=8, help="encoder block aligned to DINOv2 (1-based)")
    add("--repa-weight", type=positive, default=0.5, help="weight of the REPA loss")
    add("--class-dropout", type=share, default=0.1, help="share of labels set to the null class")
    add("--num-workers", type=plumbing.number(int, 0), help="data loader processes a rank (default: 4 on a GPU, "
                                                            "2 on the CPU)")
    add("--val-data", help="held-out dataset (same VAE, resolution, classes as --data) for the validation loss")
    add("--val-every", type=every_n, help="steps per validation loss (default: --ckpt-every)")
    add("--val-size", type=count, help="validate on the first this many images of the val set's fixed seeded "
                                        "order (default: all)")
    add("--eval-only", action="store_true", help="print the validation loss of OUT/ckpt.pt and exit, writing nothing")
    args = p.parse_args(argv)
    if args.eval_only and not args.val_data:
        p.error("--eval-only needs --val-data")
    if args.init_from and not os.path.isfile(args.init_from):
        p.error(f"--init-from {args.init_from}: no such file (a run's ckpt.pt, or a released checkpoint)")
    args.val_every = args.ckpt_every if args.val_every is None else args.val_every
    return args


def add_model_args(p, default):
    """--model PRESET and the flags that override its fields (train.py and bench.py)."""
    p.add_argument("--model", default=default, choices=list(ddt.PRESETS), metavar="PRESET",
                   help="one of " + ", ".join(ddt.PRESETS))
    for name in ("hidden-size", "num-heads", "encoder-depth", "decoder-depth", "patch-size"):
        lo = 0 if name == "decoder-depth" else 1  # decoder depth 0: the improved DiT
        p.add_argument(f"--{name}", type=plumbing.number(int, lo), help="override the preset's value")


def model_config(args, meta):
    """The preset with the flags' overrides, channels and classes from the dataset's meta, checked."""
    over = {k: getattr(args, k) for k in ("hidden_size", "num_heads", "encoder_depth", "decoder_depth", "patch_size")
            if getattr(args, k) is not None}
    try:
        cfg = replace(ddt.PRESETS[args.model], in_channels=meta["latent_shape"][0], num_classes=meta["num_classes"],
                      **over)
    except ValueError as e:
        plumbing.refuse(f"--hidden-size / --num-heads: {e}")
    _, h, w = meta["latent_shape"]
    if h % cfg.patch_size or w % cfg.patch_size:
        plumbing.refuse(f"--patch-size {cfg.patch_size} does not divide the data's {h}x{w} latents")
    if getattr(args, "dino", None) and not 1 <= args.repa_layer <= cfg.encoder_depth:
        plumbing.refuse(f"--repa-layer {args.repa_layer} must be in 1..{cfg.encoder_depth} (the encoder depth"
                        f"{'' if cfg.decoder_depth else ': all the blocks of an improved DiT'})")
    return cfg


def build(cfg, teacher, args, device):
    """(ModelWithProjector: the model and the REPA projector, the model's float32 EMA, AdamW), seeded by --seed."""
    torch.manual_seed(args.seed)
    model = ddt.DDT(cfg)
    model.grad_checkpoint = args.grad_checkpoint  # off: the paper's memory fits (RESULTS: memory)
    student = ModelWithProjector(model, teacher.embed_dim if teacher else 0, args.repa_layer).to(device)
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=tuple(args.betas),  # fused: found_inf
                            weight_decay=args.weight_decay, fused=True)
    return student, ema, opt


def resume_or_start(args, student, ema, opt, device):
    """The step to start from: that of OUT/ckpt.pt, whose model, REPA projector, EMA and AdamW state are loaded
    after checking that it is this run's (plumbing.resume_run), or 0."""
    order = {"global_batch_size": args.global_batch_size, "seed": args.seed}
    checks = {"data_order": (order, "resume with the same --global-batch-size and --seed, so that the data order "
                                    "continues"),
              "config": (asdict(student.model.cfg), "use the same model flags, or another --out-dir"),
              "repa": (student.projector is not None, "resume with --dino if and only if the run had it")}
    modules = {"model": student.model, "ema": ema, "projector": student.projector}
    hyper = dict(lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)  # the flags win (a lower --lr)
    step = plumbing.resume_run(args.out_dir, checks, modules, opt, hyper, device)
    if step > args.max_steps:
        plumbing.refuse(f"{args.out_dir}/ckpt.pt is at step {step}, past --max-steps {args.max_steps}; raise "
                        f"--max-steps to train on, or use another --out-dir")
    if args.init_from and step:
        plumbing.print0(f"{args.out_dir} holds a run at step {step}: resuming it (--init-from only starts a run)")
    elif args.init_from:
        init_from(args, student, ema)
    return step


def init_from(args, student, ema):
    """--init-from: the model and its EMA start from the source's EMA weights; the optimizer, the step (0) and
    the data order are the new run's own."""
    try:
        fresh = pretrained.init_weights(args.init_from, student.model, student.projector, args.allow_pickle)
    except (OSError, ValueError) as e:  # plumbing.CheckpointError is a ValueError
        plumbing.refuse(f"--init-from: {e}")
    ema.load_state_dict(student.model.state_dict())
    made = f"; made afresh: {'; '.join(fresh)}" if fresh else ""
    plumbing.print0(f"initialized from {args.init_from} (its EMA weights){made}")


def training_flops(student, teacher, meta):
    """Matmul FLOPs of one training image, for MFU: 3x the forward (forward and backward) of the DDT and of REPA's
    projector, and the teacher's forward."""
    (h, w), p = meta["latent_shape"][1:], student.model.cfg.patch_size
    flops = 3 * ddt.flops_per_image(student.model.cfg, h, w)
    if student.projector is not None:  # each token through the projector's Linears; the teacher
        flops += 3 * 2 * (h // p) * (w // p) * sum(m.weight.numel() for m in student.projector if hasattr(m, "weight"))
        flops += teacher.flops(meta["resolution"], meta["resolution"])
    return flops


def describe_run(args, cfg, model, data, val, step):
    """The run's first line: the model, how a step is split, the precision, the data, the steps, the validation."""
    world = plumbing.rank_world()[1]
    return (f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {asdict(cfg)}\n{world} rank(s) x "
            f"{args.grad_accum} micro-step(s) x {args.global_batch_size // world // args.grad_accum} images, "
            f"{args.precision}{', compiled' * args.compile}, {len(data.valid)} images, steps {step} -> {args.max_steps}"
            + (f", validation on {len(val.rows)} images every {args.val_every} steps" if val else ""))


if __name__ == "__main__":
    main()
