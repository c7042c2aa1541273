"""
Sample images from a DDT with the released samplers (Euler, its stochastic step rules, and the Adams linear
multistep solver of order 1-3, all one loop), classifier-free guidance on an interval, and encoder sharing
(run the condition encoder at K of the N steps, the steps chosen by a dynamic program), for every solver.

    python sample.py --ckpt out/ckpt.pt --num-samples 16 --out grid.png               # project checkpoint
    python sample.py --ckpt ddt_xl_256.ckpt --model DDT-XL/2 --vae sd-vae-ft-ema \\
        --classes 207 360 387 974 --cfg-scale 2.0 --out grid.png                       # released weights
    torchrun --nproc_per_node 8 sample.py --ckpt ddt_xl_256.ckpt --vae sd-vae-ft-ema \\
        --num-samples 50000 --cfg-scale 2.0 --encoder-steps 125 --npz samples.npz      # ADM evaluator input
    python sample.py --ckpt out/ckpt.pt --solver adams --order 2 --num-steps 100 --encoder-steps 50  # Adams-2

Project checkpoints carry their config and data description; released (Lightning) ones take --model
(DDT-XL/2) and --image-size (256), and are ImageNet models on SD-VAE latents. The noise of sample i depends
only on (--seed, i), and so does the noise the --sde steps add (drawn from the same per-image generator), so
the images do not depend on the number of ranks (nor, on the CPU, on the batch size; GPU kernels may round
differently at other batch sizes). With --npz,
finished batches go to NPZ_parts/ and a rerun skips them; SIGTERM, SIGUSR1 or SIGINT stops every rank after its
batch in progress, keeping the finished ones, with exit status plumbing.EXIT_STOPPED (75); one run at a time per
--npz (rank 0 locks NPZ.lock, removed when the run ends). Checkpoints are read
memory-mapped and only the EMA weights are used, so ranks do not hold the optimizer state.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import ddt
import plumbing
import pretrained

# -----------------------------------------------------------------------------------------------
# timesteps, guidance, noise and the solvers


def timesteps(num_steps, last_step=0.04, timeshift=1.0):
    """(N + 1,) float32 times as released: linspace(0, 1 - last_step, N), then 1.0, warped by the shift."""
    if last_step is None or num_steps == 1:
        last_step = 1.0 / num_steps
    t = torch.cat([torch.linspace(0.0, 1.0 - last_step, num_steps), torch.ones(1)])
    return t / (t + (1 - t) * timeshift)


def guided_steps(t, cfg_scale, cfg_interval):
    """Per step: is guidance on? Strictly inside the interval, as released (a t equal to a bound gets none)."""
    lo, hi = cfg_interval
    return [cfg_scale != 1.0 and bool(lo < t_i < hi) for t_i in t]  # t_i float32, compared as released


def plan_halves(guided, encoder_runs):
    """Per step: run the unconditional half too (2B)? At guided steps, and at an encoder step whose z is
    reused by a later guided step: that z must then exist for both halves."""
    both, need = [False] * len(guided), False
    for i in reversed(range(len(guided))):
        need = need or guided[i]
        both[i] = need if encoder_runs[i] else guided[i]
        if encoder_runs[i]:
            need = False
    return both


def draw_noise(generators, shape):
    """(len(generators), *shape) float32: the next draw of each image's generator."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def image_noise(seed, indices, shape):
    """(noise, generators): image i's initial noise is the first draw of a CPU generator seeded by (seed, i)
    alone, and the SDE steps draw their noise from the same generator after it, so a sample never depends on
    the batch or the rank it is drawn in."""
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]
    return draw_noise(generators, shape), generators


def sample_noise(seed, indices, shape):
    """(len(indices), *shape) float32 noise; sample i's depends only on (seed, i), never on batch or rank."""
    return image_noise(seed, indices, shape)[0]


def adams_coefficients(t, order):
    """Per step i, the weights c_i of the last m = min(order, i + 1) velocities (oldest first), as the released
    AdamLMSampler computes them (lagrange_preint): the integral over [t_i, t_i+1] of the Lagrange basis
    polynomial of each of the nodes t_i-m+1 .. t_i, normalised to sum to 1. The order warms up over the first
    steps (1, 2, ..); order 1 is Euler, c_i = [1.0]. float64 (the released code computes them in float32)."""
    t = t.double().numpy()
    coeffs = []
    for i in range(len(t) - 1):
        nodes, c = t[max(0, i + 1 - order): i + 1], []
        for j in range(len(nodes)):
            others = np.delete(nodes, j)
            basis = np.polyint(np.atleast_1d(np.poly(others)) / np.prod(nodes[j] - others))  # integral of l_j
            c.append(np.polyval(basis, t[i + 1]) - np.polyval(basis, t[i]))
        coeffs.append([float(c_j / sum(c)) for c_j in c])
    return coeffs


# the released stochastic step rules: x + v dt + a s w dt + sqrt(b w dt) eps, name -> (a, b)
SDE_RULES = {"sde": (1.0, 2.0), "sde-mean": (1.0, 0.0), "sde-preserve": (0.5, 1.0)}


@torch.no_grad()
def sample_loop(model, noise, y, num_steps=250, order=1, sde="none", generators=None, cfg_scale=1.0,
                cfg_interval=(0.3, 1.0), last_step=0.04, timeshift=1.0, encoder_steps=None, stats=None,
                record_z=None, both_halves=False):
    """The one sampling loop: from noise (t = 0) to data (t = 1) on the released times; returns the final x.
    Each step computes the velocity v_i (below), then moves x by the solver's rule:

        order 1 (Euler), 2, 3 (Adams):  x <- x + (t_i+1 - t_i) * sum_j c_ij v_i-m+1+j   (c: adams_coefficients)
        sde in SDE_RULES (order 1):     x <- x + v_i dt + a s w dt + sqrt(b w dt) eps,  score s = (t v_i - x) / (1 - t),
                                        w = 1 - t (the linear scheduler's w(t) = sigma(t)), eps from `generators`
                                        (one per image: image_noise); the last step is the ODE step, as released

    v = v_null + cfg_scale * (v_cond - v_null) at steps with interval_min < t < interval_max, the conditional
    v elsewhere (where only the conditional half runs, unless `both_halves`: the unconditional half at every
    step, as the released sampler runs it). `encoder_steps`: sorted step indices where the encoder runs
    (None = all, must contain 0); the other steps reuse the latest z. Optional outputs: `stats` gets
    "encoder_evals" / "decoder_evals" (images) added, `record_z` gets each computed z (float32, cpu; (B, N, D),
    or (2B, N, D) conditional half first where both halves ran) appended. The result equals running both
    halves at every step.
    """
    B = noise.shape[0]
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if sde != "none" and (sde not in SDE_RULES or order != 1):
        raise ValueError(f"sde must be 'none' or one of {list(SDE_RULES)}, with order 1 (the released Adams "
                         f"sampler has only the ODE step), got sde={sde!r}, order={order}")
    if sde != "none" and SDE_RULES[sde][1] and (generators is None or len(generators) != B):
        raise ValueError(f"sde={sde!r} draws noise from one generator per image: pass generators (image_noise)")
    if encoder_steps is None:
        encoder_steps = range(num_steps)
    encoder_steps = list(encoder_steps)
    if not encoder_steps or encoder_steps[0] != 0 or encoder_steps != sorted(set(encoder_steps)) \
            or encoder_steps[-1] >= num_steps:
        raise ValueError(f"encoder_steps must be sorted distinct steps in [0, {num_steps}) starting with 0, "
                         f"got {encoder_steps}")
    t = timesteps(num_steps, last_step, timeshift)
    coeffs = adams_coefficients(t, order)
    encoder_runs = [False] * num_steps
    for i in encoder_steps:
        encoder_runs[i] = True
    guided = guided_steps(t[:num_steps], cfg_scale, cfg_interval)
    both = [True] * num_steps if both_halves else plan_halves(guided, encoder_runs)
    t = t.to(noise.device, noise.dtype)
    y2 = torch.cat([y, torch.full_like(y, model.cfg.num_classes)])  # (2B,) conditional half first, then null
    stats = {} if stats is None else stats
    x, z, history = noise, None, []  # history: the last `order` velocities
    for i in range(num_steps):
        n = 2 * B if both[i] else B
        x_in = torch.cat([x, x]) if both[i] else x  # (n, C, H, W), n = B or 2B
        v, z_i = model(x_in, t[i].repeat(n), y2[:n], None if encoder_runs[i] else z[:n])
        v = v.float()  # guidance and the step in float32, also under bf16 autocast
        if encoder_runs[i]:
            z = z_i  # (n, N, D), reused until the next encoder step
            stats["encoder_evals"] = stats.get("encoder_evals", 0) + n
            if record_z is not None:
                record_z.append(z_i.detach().float().cpu())
        stats["decoder_evals"] = stats.get("decoder_evals", 0) + n
        if guided[i]:
            v_cond, v_null = v.chunk(2)
            v = v_null + cfg_scale * (v_cond - v_null)
        else:
            v = v[:B]
        dt, history = t[i + 1] - t[i], (history + [v])[-order:]
        if sde == "none" or i == num_steps - 1:  # Euler / Adams: a weighted sum of the last velocities
            x = x + sum(c * v_j for c, v_j in zip(coeffs[i], history[-len(coeffs[i]):])) * dt
        else:
            (a, b), w = SDE_RULES[sde], 1 - t[i]
            s = (t[i] * v - x) / (1 - t[i])  # the score from v, for the linear scheduler (alpha = t, sigma = 1 - t)
            x = x + v * dt + a * s * w * dt
            if b:
                x = x + torch.sqrt(b * w * dt) * draw_noise(generators, x.shape[1:]).to(x.device)
    return x


def euler_sample(model, noise, y, num_steps=250, cfg_scale=1.0, cfg_interval=(0.3, 1.0), last_step=0.04,
                 timeshift=1.0, encoder_steps=None, stats=None, record_z=None, both_halves=False):
    """The released EulerSampler's ODE (x <- x + v dt): sample_loop with order 1."""
    return sample_loop(model, noise, y, num_steps, 1, "none", None, cfg_scale, cfg_interval, last_step, timeshift,
                       encoder_steps, stats, record_z, both_halves)


def adams_sample(model, noise, y, num_steps=250, order=2, cfg_scale=1.0, cfg_interval=(0.3, 1.0), last_step=0.04,
                 timeshift=1.0, encoder_steps=None, stats=None, record_z=None, both_halves=False):
    """The released AdamLMSampler (its default order 2): sample_loop with `order` (1 is Euler)."""
    return sample_loop(model, noise, y, num_steps, order, "none", None, cfg_scale, cfg_interval, last_step,
                       timeshift, encoder_steps, stats, record_z, both_halves)


# -----------------------------------------------------------------------------------------------
# encoder sharing


def solve_sharing(cost, k):
    """The k encoder steps R (sorted, R[0] = 0) minimizing sum_i cost[i, r(i)], r(i) = max{a in R: a <= i}.

    A segment [a, b) served by the encoder run at step a costs seg[a, b] = sum_{i=a}^{b-1} cost[i, a]
    (column cumulative sums). F[m, b], the best cost of steps 0..b-1 with m runs, the last segment ending
    at b, obeys  F[1, b] = seg[0, b],  F[m, b] = min_{a < b} F[m-1, a] + seg[a, b];  the answer is F[k, N],
    and back-tracking the minimizing a's gives R. Exact, O(k N^2) time. Infinite entries (reuse that was not
    measured) are never used; a ValueError says so if k runs cannot avoid them.
    """
    cost = np.asarray(cost.detach().cpu() if torch.is_tensor(cost) else cost, dtype=np.float64)
    N = cost.shape[0]
    if cost.shape != (N, N):
        raise ValueError(f"cost must be a square matrix, got shape {cost.shape}")
    if not 1 <= k <= N:
        raise ValueError(f"--encoder-steps must be between 1 and the number of steps {N}, got {k}")
    P = np.concatenate([np.zeros((1, N)), np.cumsum(cost, axis=0)])  # P[b, a] = sum_{i<b} cost[i, a]
    seg = P.T - np.diagonal(P)[:, None]  # (N, N + 1): seg[a, b] = P[b, a] - P[a, a]
    seg[np.arange(N + 1)[None, :] <= np.arange(N)[:, None]] = math.inf  # empty segments: b <= a
    F_, arg = np.full((k + 1, N + 1), math.inf), np.zeros((k + 1, N + 1), dtype=np.int64)
    F_[1] = seg[0]
    for m in range(2, k + 1):
        total = F_[m - 1, :N, None] + seg  # (a, b)
        arg[m], F_[m] = total.argmin(axis=0), total.min(axis=0)
    if F_[k, N] == math.inf:
        raise ValueError(f"no schedule of {k} encoder steps avoids the infinite (unmeasured) entries of the cost")
    steps, b = [], N
    for m in range(k, 1, -1):
        b = int(arg[m, b])
        steps.append(b)
    return [0] + steps[::-1]


def sharing_cost(cost, steps):
    """sum_i cost[i, r(i)] of a schedule (the objective solve_sharing minimizes)."""
    cost = np.asarray(cost, dtype=np.float64)
    r = np.maximum.accumulate(np.isin(np.arange(len(cost)), steps) * np.arange(len(cost)))
    return float(cost[np.arange(len(cost)), r].sum())


def uniform_schedule(n, k):
    """The baseline: k steps spread evenly over n, [round(i * n / k)], distinct since n / k >= 1."""
    if not 1 <= k <= n:
        raise ValueError(f"--encoder-steps must be between 1 and the number of steps {n}, got {k}")
    return [(2 * i * n + k) // (2 * k) for i in range(k)]  # round half up, in integers


def measure_sharing_cost(model, num_steps, latent_shape, num_classes=None, batch_size=8, seed=0, device=None,
                         **sampler_kwargs):
    """The paper's proxy: (N, N) float64 cost[i, j] = 1 - cos(z_i, z_j), averaged over the tokens of both
    guidance halves (conditional and unconditional, with or without guidance, as the released sharing_dp
    averages them) of a small seeded batch, cosine over D, from one sampling run with the encoder and both
    halves at every step, along the trajectory of the solver that `sampler_kwargs` (order, sde, guidance, ..
    of sample_loop) choose. Symmetric, zero diagonal. Costs one unshared sampling run of 2 x batch_size images."""
    K = model.cfg.num_classes if num_classes is None else num_classes
    device = next(model.parameters()).device if device is None else device
    y = torch.tensor([i * K // batch_size for i in range(batch_size)], device=device)  # labels spread over classes
    noise, generators = image_noise(seed, range(batch_size), latent_shape)  # the generators: for the SDE steps
    zs = []  # num_steps x (2B, tokens, D)
    sample_loop(model, noise.to(device), y, num_steps, generators=generators, encoder_steps=None, record_z=zs,
                both_halves=True, **sampler_kwargs)
    gram = torch.zeros(num_steps, num_steps, dtype=torch.float64)
    for b in range(2 * batch_size):  # one image at a time keeps the float64 copy small
        zb = F.normalize(torch.stack([z[b] for z in zs]).double(), dim=-1).flatten(1)  # (num_steps, tokens * D)
        gram += zb @ zb.T
    return (1.0 - gram / (2 * batch_size * zs[0].shape[1])).numpy()


# -----------------------------------------------------------------------------------------------
# images out


def to_uint8(x):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 with the ADM / released rounding."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_npz(path, images, labels):
    """ADM evaluator layout: arr_0 uint8 (N, H, W, 3), arr_1 int64 (N,); written atomically."""
    with plumbing.atomic_write(path) as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, arr_0=np.asarray(images, dtype=np.uint8), arr_1=np.asarray(labels, dtype=np.int64))


def save_grid(path, images, labels, class_names=None, per_row=10):
    """One row per class, in the order the classes first appear, its name (or index) at the left in a margin as
    wide as the longest name; a class with more than `per_row` images takes more rows. Small images are enlarged
    (nearest neighbour) to at least 64 px so that they can be seen. The grid of sample.py and of train.py."""
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
    cols = max(len(idx) for _, idx in rows)
    gap = 2  # white between the images
    canvas = Image.new("RGB", (margin + cols * (W + gap), len(rows) * (H + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (y, idx) in enumerate(rows):
        if y is not None:
            draw.text((4, r * (H + gap) + H // 2), names[y], fill="black", font=font, anchor="lm")
        for c, i in enumerate(idx):
            canvas.paste(Image.fromarray(images[i]), (margin + c * (W + gap), r * (H + gap)))
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    with plumbing.atomic_write(path) as f:
        canvas.save(f, format=fmt)


# -----------------------------------------------------------------------------------------------
# command line

GRID_MAX = 100  # a grid shows at most this many images: one of 50k helps nobody


def read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def sharing_schedule(args, k, model, latent_shape, device, autocast, cache_dirs):
    """--encoder-steps K with --sharing uniform|dp: the DP on the paper's cosine cost (measure_sharing_cost),
    measured along the trajectory of the chosen solver. A DP schedule is cached as JSON next to the checkpoint,
    keyed by everything it depends on (the solver, its order and step rule too)."""
    N = args.num_steps
    if k == N:
        return None
    if args.sharing == "uniform":
        steps = uniform_schedule(N, k)
        print(f"encoder steps (uniform): {steps}")
        return steps
    precision = str(autocast.fast_dtype).removeprefix("torch.") if isinstance(autocast, torch.autocast) else "float32"
    key = json.dumps(dict(sharing=args.sharing, solver=args.solver, order=args.order, sde=args.sde, num_steps=N, k=k,
                          cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, timeshift=args.timeshift,
                          last_step=args.last_step, latent_shape=list(latent_shape), precision=precision,
                          device=device.type, model=asdict(model.cfg), ckpt_bytes=os.path.getsize(args.ckpt),
                          ckpt_mtime=os.path.getmtime(args.ckpt)))
    paths = [os.path.join(d, os.path.basename(args.ckpt) + ".sharing.json") for d in cache_dirs]
    for path in paths:
        if key in (cache := read_json(path)):
            print(f"encoder steps (DP, cached in {path}): {cache[key]['steps']}")
            return cache[key]["steps"]
    with autocast:
        cost = measure_sharing_cost(model, N, latent_shape, device=device, order=args.order, sde=args.sde,
                                    cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                                    last_step=args.last_step, timeshift=args.timeshift)
    steps = solve_sharing(cost, k)
    entry = dict(steps=steps, cost=sharing_cost(cost, steps), uniform_cost=sharing_cost(cost, uniform_schedule(N, k)))
    print(f"encoder steps (DP, reuse cost {entry['cost']:.4f} vs uniform {entry['uniform_cost']:.4f}): {steps}")
    for path in paths:  # next to the checkpoint, else next to the output
        try:
            cache = read_json(path)
            cache[key] = entry
            with plumbing.atomic_write(path, "w") as f:
                json.dump(cache, f, indent=1)
            break
        except OSError:
            continue
    return steps


def checkpoint_info(args):
    """(ckpt, config for load_ddt, latent_shape, scaling_factor, vae_name, class_names) of either kind. The
    checkpoint is memory-mapped, and the optimizer state (and REPA projector) is dropped before anything reads
    it: sampling needs the EMA weights only."""
    ckpt = ddt.load_checkpoint(args.ckpt, args.allow_pickle)
    if isinstance(ckpt, dict) and "config" in ckpt:  # nanoDDT: config and data description inside
        for key in ("optimizer", "projector"):
            ckpt.pop(key, None)
        d = ckpt.get("data") or {}
        if not {"latent_shape", "scaling_factor"} <= d.keys():
            raise SystemExit(f"error: '{args.ckpt}' has no 'data' entry with latent_shape and scaling_factor")
        vae = str(d.get("vae", "none"))
        if args.vae and vae != "none" and os.path.realpath(args.vae) != os.path.realpath(vae):
            print(f"warning: --vae {args.vae} is not the VAE that '{args.ckpt}' was trained with ({vae}); the "
                  f"samples are right only if the two are the same weights", file=sys.stderr)
        return ckpt, args.model, tuple(d["latent_shape"]), d["scaling_factor"], vae, d.get("class_names")
    if isinstance(ckpt, dict) and "state_dict" in ckpt:  # released: keep the weights, not the optimizer states
        ckpt = {"state_dict": ckpt["state_dict"]}
    # released Lightning checkpoint (or not a checkpoint at all: load_ddt says so): ImageNet, SD-VAE latents
    config = args.model or "DDT-XL/2"
    C = ddt.PRESETS[config].in_channels if config in ddt.PRESETS else 4
    return ckpt, config, (C, args.image_size // 8, args.image_size // 8), pretrained.VAE_SCALE, "sd-vae-ft-ema", None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=plumbing.HelpFormatter)
    p.add_argument("--ckpt", required=True, help="project checkpoint, or a released Lightning one (see --model)")
    p.add_argument("--model", default=None, help="preset of a released checkpoint (default DDT-XL/2)")
    p.add_argument("--image-size", type=int, default=256, help="released checkpoints: image size (latent = /8)")
    p.add_argument("--vae", default=None, help="SD-VAE folder or weights file (latent models only)")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class of each sample (cycled)")
    p.add_argument("--num-samples", type=int, default=None, help="default: len(--classes), else 8")
    p.add_argument("--num-steps", type=int, default=250, help="solver steps N (the paper: 250)")
    p.add_argument("--solver", choices=["euler", "adams"], default="euler",
                   help="euler: the released EulerSampler; adams: the released AdamLMSampler (linear multistep)")
    p.add_argument("--order", type=int, choices=[1, 2, 3], default=None,
                   help="--solver adams: how many past velocities each step combines (default 2, as released)")
    p.add_argument("--sde", choices=["none", *SDE_RULES], default="none",
                   help="--solver euler: the released stochastic step rule (default none: the ODE)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (paper: 2.0 at 256 px)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.3, 1.0], metavar=("MIN", "MAX"),
                   help="guidance only while MIN < t < MAX")
    p.add_argument("--timeshift", type=float, default=1.0, help="time grid warp t / (t + (1 - t) shift)")
    p.add_argument("--last-step", type=float, default=0.04, help="length of the final step to t = 1")
    p.add_argument("--seed", type=int, default=0, help="noise of sample i comes from (seed, i)")
    p.add_argument("--encoder-steps", type=int, default=None, help="encoder runs K (default: every step)")
    p.add_argument("--sharing", choices=["dp", "uniform"], default="dp",
                   help="which K steps run the encoder: the DP on the paper's cosine cost, or spread evenly")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--out", default=None, help="labelled grid image (default samples.png without --npz)")
    p.add_argument("--npz", default=None, help="ADM-evaluator .npz (arr_0 uint8 NHWC, arr_1 int64 labels)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--allow-pickle", action="store_true", help="trust a checkpoint that needs pickle")
    args = p.parse_args(argv)
    args.out = args.out or (None if args.npz else "samples.png")
    plumbing.check_output_folders(("--out", args.out), ("--npz", args.npz))  # before sampling, not after
    for flag, value in (("--num-steps", args.num_steps), ("--batch-size", args.batch_size),
                        ("--num-samples", args.num_samples or 1)):
        if value < 1:
            raise SystemExit(f"error: {flag} must be at least 1, got {value}")
    if args.order is not None and args.solver != "adams":
        raise SystemExit(f"error: --order {args.order} is for --solver adams (Euler is order 1); add --solver adams "
                         f"or drop --order")
    if args.sde != "none" and args.solver != "euler":
        raise SystemExit(f"error: --sde {args.sde} is for --solver euler: the released AdamLMSampler has only the ODE "
                         f"step; use --solver euler --sde {args.sde}, or drop --sde")
    args.order = (args.order or 2) if args.solver == "adams" else 1
    if args.encoder_steps is not None and not 1 <= args.encoder_steps <= args.num_steps:
        raise SystemExit(f"error: --encoder-steps must be between 1 and --num-steps ({args.num_steps}), "
                         f"got {args.encoder_steps}")

    rank, _, world, device = plumbing.setup_dist()
    lock = None
    try:
        if rank == 0 and args.npz:  # one run per --npz: a second would delete this one's parts in flight
            lock = plumbing.lock_file(args.npz + ".lock", "--npz", args.npz, "sample.py")
        with plumbing.stop_signals() as received:
            run(args, rank, world, device, received)
    finally:
        if lock is not None:
            plumbing.unlock(lock, remove=True)
        plumbing.cleanup_dist()


def weights_digest(model):
    """sha1 of the model's weights (names, dtypes, shapes, bytes): which weights a rank samples with."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def join_parts(npz, paths, n, labels):
    """The finished batches' files (in order) joined into the ADM .npz, then removed (and their folder, if
    empty); returns the images."""
    images, s = None, 0
    for path in paths:
        with np.load(path) as f:
            images = np.empty((n, *f["arr_0"].shape[1:]), np.uint8) if images is None else images
            images[s:s + len(f["arr_0"])] = f["arr_0"]
            s += len(f["arr_0"])
    save_npz(npz, images, labels)
    for path in paths:
        os.remove(path)
    if not os.listdir(os.path.dirname(paths[0])):
        os.rmdir(os.path.dirname(paths[0]))
    print(f"wrote {npz}: arr_0 uint8 {images.shape}, arr_1 int64 labels")
    return images


def run(args, rank, world, device, received):
    try:
        ckpt, config, latent_shape, scale, vae_name, names = checkpoint_info(args)
        pixel = vae_name.lower() == "none"
        if not pixel and args.vae is None:
            raise SystemExit(f"error: '{args.ckpt}' is a latent model (its VAE: {vae_name}): pass --vae PATH")
        model = ddt.load_ddt(args.ckpt, config, ema=True, ckpt=ckpt)
        del ckpt
        digest = weights_digest(model)
        model = model.to(device)
        vae = None if pixel else pretrained.load_vae(args.vae).to(device)
    except (OSError, ValueError) as e:  # ddt.CheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from None
    if args.encoder_steps is not None and not model.cfg.decoder_depth:
        raise SystemExit(f"error: --encoder-steps: '{args.ckpt}' is an improved DiT (decoder_depth 0): it has no "
                         f"encoder/decoder split, so there is no z to share; leave --encoder-steps out")
    if world > 1:  # a checkpoint rewritten while the ranks read it would mix two models in one .npz
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise SystemExit(f"error: the ranks read different weights from '{args.ckpt}' (was it rewritten while "
                             f"they loaded it?); rerun when it no longer changes, or sample from a copy")
    K, k = model.cfg.num_classes, args.encoder_steps or args.num_steps
    classes = args.classes if args.classes is not None else list(range(K))
    if bad := [c for c in classes if not 0 <= c < K]:
        raise SystemExit(f"error: --classes {bad} out of range: the model has classes 0..{K - 1}")
    n = args.num_samples or (len(args.classes) if args.classes else 8)
    if n > GRID_MAX and not args.npz:
        print(f"without --npz only the {GRID_MAX} images of the grid are sampled, not {n}")
        n = GRID_MAX
    labels = [classes[i % len(classes)] for i in range(n)]  # balanced when n is a multiple of len(classes)
    bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    out_dir = os.path.dirname(os.path.abspath(args.npz or args.out))

    steps = None
    if rank == 0:
        steps = sharing_schedule(args, k, model, latent_shape, device, autocast,
                                 [os.path.dirname(os.path.abspath(args.ckpt)), out_dir])
    steps = plumbing.from_rank0(steps)

    settings = dict(weights=digest, seed=args.seed, num_steps=args.num_steps, solver=args.solver, order=args.order,
                    sde=args.sde, cfg=[args.cfg_scale] + args.cfg_interval,
                    timeshift=args.timeshift, last_step=args.last_step, encoder_steps=steps, bf16=bf16, vae=args.vae,
                    classes=classes, latent_shape=list(latent_shape), model=asdict(model.cfg))
    tag = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:10]  # parts of other settings never mix in
    tag = plumbing.from_rank0(tag)  # rank 0 decides: every rank names its parts alike
    parts = os.path.splitext(args.npz)[0] + "_parts" if args.npz else None
    if parts:
        os.makedirs(parts, exist_ok=True)
        if rank == 0:  # what a killed run's atomic writes left (no rank writes before rank 0's list below)
            plumbing.remove_stale_tmp(os.path.join(glob.escape(parts), "*"), glob.escape(args.npz))

    def part_path(s, e):
        return os.path.join(parts, f"{s:07d}_{e:07d}_{tag}.npz")

    chunks = [(s, min(s + args.batch_size, n)) for s in range(0, n, args.batch_size)]
    # the rest were done by an earlier run; rank 0 lists them for all ranks (one list, so every batch has one
    # owner and every rank makes the same number of rounds below), before any rank writes new parts
    todo = [c for c in chunks if not (parts and os.path.exists(part_path(*c)))] if rank == 0 else None
    todo = plumbing.from_rank0(todo)
    kept, stats, done, t0 = {}, {"encoder_evals": 0, "decoder_evals": 0}, 0, time.time()
    mine = todo[rank::world]
    for r in tqdm(range(math.ceil(len(todo) / world)), disable=rank != 0, desc=f"sampling on {world} rank(s)"):
        # every rank makes the same number of rounds (its last one may be empty): the stop check is a collective
        if stop := plumbing.stop_requested(received, device):
            kept_msg = f"the finished batches are kept in {parts}" if parts else "without --npz nothing is kept"
            if rank == 0:
                print(f"stopped by {signal.Signals(stop).name}: {kept_msg}; rerun the same command to resume",
                      flush=True)
            raise SystemExit(plumbing.EXIT_STOPPED)
        if r == len(mine):
            continue
        s, e = mine[r]
        noise, generators = image_noise(args.seed, range(s, e), latent_shape)  # (b, C, H, W), one generator each
        with autocast:
            x = sample_loop(model, noise.to(device), torch.tensor(labels[s:e], device=device), args.num_steps,
                            args.order, args.sde, generators, args.cfg_scale, tuple(args.cfg_interval), args.last_step,
                            args.timeshift, steps, stats=stats)
        with torch.no_grad():
            img = to_uint8(x if pixel else vae.decode(x.float() / scale))  # (b, H, W, 3) uint8
        if parts:
            save_npz(part_path(s, e), img, labels[s:e])
        else:
            kept.update(zip(range(s, e), img))
        done += e - s

    counts = torch.tensor([done, stats["encoder_evals"], stats["decoder_evals"]], dtype=torch.float64)
    if world > 1:  # sum the counts, bring the images to rank 0
        counts = counts.to(device)
        dist.all_reduce(counts)
        gathered = [None] * world
        dist.all_gather_object(gathered, kept)
        kept = {i: im for g in gathered for i, im in g.items()}
        dist.barrier()  # every part is on disk
    if rank != 0:
        return
    done, enc, dec = counts.tolist()
    secs = time.time() - t0
    print(f"sampled {int(done)} images, {args.num_steps} steps each, in {secs:.1f} s ({done / max(secs, 1e-9):.2f} "
          f"images/s)")
    if steps is not None:  # what sharing saved, counted in network passes over one image
        print(f"encoder sharing: the encoder ran at {len(steps)} of the {args.num_steps} steps, {int(enc)} passes over "
              f"one image against the decoder's {int(dec)} (a guided step makes two passes: with and without the "
              f"class)")
    images = join_parts(args.npz, [part_path(*c) for c in chunks], n, labels) if parts else \
        np.stack([kept[i] for i in range(n)])
    if args.out:
        save_grid(args.out, images[:GRID_MAX], labels[:GRID_MAX], names)
        print(f"wrote {args.out}" + (f" (the first {GRID_MAX} of {n} images)" if n > GRID_MAX else ""))


if __name__ == "__main__":
    main()
