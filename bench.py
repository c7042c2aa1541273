"""
Benchmark a DDT training step and sampling, and compare with the released implementation's arithmetic.

    python bench.py                                        # CPU: the issue's config (D 384, 8+4 blocks, batch 8)
    python bench.py --model DDT-XL/2 --batch-size 32 --image-size 32 --precision bf16 --compile   # one GPU
    python bench.py --model DDT-XL/2 --batch-size 64 --sample --num-steps 250 --encoder-steps 50 --precision bf16
    python bench.py --sample --ckpt runs/toy/ckpt.pt --num-steps 100 --encoder-steps 10 25 50 --batch-size 32 \\
        --cfg-scale 3.0 --sharing dp dp-velocity uniform    # sharing schedules side by side on a trained model
    python bench.py --sample --ckpt runs/toy_s0/ckpt.pt runs/toy_s1/ckpt.pt runs/toy_s2/ckpt.pt --frontier \\
        --num-steps 10 20 50 100 250 --batch-size 32 --cfg-scale 3.0   # solvers: error against steps, 3 models
    python bench.py --sample --ckpt runs/toy/ckpt.pt --heatmap cost.png --num-steps 100 --encoder-steps 10 \\
        --cfg-scale 3.0                                     # what the sharing DP sees, as a picture
    python bench.py --sample --ckpt runs/digits/ckpt.pt --sde-check data/digits --num-steps 100 --cfg-scale 3.0

A training step is forward, backward, AdamW and the EMA update, on random data of the right shape. With
--compare (default on CPU) the same model is also timed with the released code's implementations of the
pieces nanoDDT rewrote (complex-number RoPE with float32 upcasts, RMSNorm as pow/mean/rsqrt, unfold/fold
patchify, float32 q/k norms), in the same process, interleaved, so the ratio is fair. Reports images/s,
model FLOPs per image, achieved TFLOP/s, MFU against the GPU's bf16 peak, peak memory, and each step time
against a floor: all of the step's FLOPs at the rate this device measures on the model's MLP product.
With --sample --ckpt (several checkpoints of one data set: mean ± sd over them): the sharing schedules, the
solvers' steps-versus-error frontier (--frontier), a distribution-level check of the SDE step rules
(--sde-check), or a picture of the cost matrix the sharing DP solves (--heatmap).
"""

import argparse
import copy
import json
import math
import os
import time
import types
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import ddt
import sample
import train

# -----------------------------------------------------------------------------------------------
# the released code's arithmetic, as a baseline (same weights, same outputs up to rounding)


def released_rmsnorm(self, x):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def released_attention(self, x, rope):
    B, N, D = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 1, 3, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, N, nh, d)
    q, k = self.q_norm(q.float()), self.k_norm(k.float())  # released: q/k norms in float32
    cis = self.cis.setdefault(id(rope[0]), torch.complex(rope[0], rope[1]))[None, :, None]  # (1, N, 1, d/2)
    q = torch.view_as_real(torch.view_as_complex(q.float().reshape(B, N, self.num_heads, -1, 2)) * cis)
    k = torch.view_as_real(torch.view_as_complex(k.float().reshape(B, N, self.num_heads, -1, 2)) * cis)
    q, k = q.flatten(3).type_as(v).transpose(1, 2), k.flatten(3).type_as(v).transpose(1, 2)
    x = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))  # (B, nh, N, d)
    return self.proj(x.transpose(1, 2).reshape(B, N, D))


def as_released(model):
    """A copy of `model` whose RMSNorms and attentions compute as the released code does (timing only)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, ddt.RMSNorm):
            m.forward = types.MethodType(released_rmsnorm, m)
        elif isinstance(m, ddt.Attention):
            m.forward, m.cis = types.MethodType(released_attention, m), {}
    return model


@contextmanager
def released_patchify():
    """While timing the baseline: patchify with F.unfold and unpatchify with F.fold, as released."""
    saved = ddt.patchify, ddt.unpatchify
    ddt.patchify = lambda x, p: F.unfold(x, p, stride=p).transpose(1, 2)
    ddt.unpatchify = lambda x, p, H, W: F.fold(x.transpose(1, 2).contiguous(), (H, W), p, stride=p)
    try:
        yield
    finally:
        ddt.patchify, ddt.unpatchify = saved


# -----------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, dtype, tokens, dim, hidden, repeats=10):
    """FLOP/s this device reaches on the model's MLP product, (tokens, dim) @ (dim, hidden), its best shape:
    a rate no implementation of the same arithmetic beats on average (measured, not the data sheet's)."""
    a = torch.randn(tokens, dim, device=device, dtype=dtype)
    b = torch.randn(dim, hidden, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):  # the first round warms up; the fastest round counts
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * tokens * dim * hidden * repeats / best


def time_train(model, batch, shape, device, precision, compile, steps, warmup):
    """Seconds per training step (median of `steps`), forward + backward + AdamW + EMA."""
    ema = copy.deepcopy(model).float().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0,
                            fused=device.type == "cuda")
    step_model = torch.compile(model) if compile else model
    autocast = train.precision_context(device, precision)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, *shape, device=device, generator=gen)
    noise = torch.randn(batch, *shape, device=device, generator=gen)
    y = torch.randint(0, model.cfg.num_classes + 1, (batch,), device=device, generator=gen)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        t = torch.sigmoid(torch.randn(batch, device=device, generator=gen))
        x_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * noise
        with autocast:
            v, _ = step_model(x_t, t, y)
        loss = F.mse_loss(v.float(), x - noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train.update_ema(ema, model, 0.9999)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def timed(device, autocast, call):
    """(call() under autocast, its seconds with the device synchronised on both sides)."""
    with autocast:
        sync(device)
        t0 = time.perf_counter()
        out = call()
        sync(device)
    return out, time.perf_counter() - t0


def time_sampling(model, batch, shape, device, precision, num_steps, encoder_steps):
    """Seconds for one batch of `num_steps` Euler steps (no guidance), encoder at `encoder_steps`."""
    autocast = train.precision_context(device, precision)
    noise = torch.randn(batch, *shape, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with autocast:
        sample.euler_sample(model, noise, y, num_steps=min(num_steps, 5))  # warm-up
    return timed(device, autocast, lambda: sample.euler_sample(model, noise, y, num_steps=num_steps,
                                                           encoder_steps=encoder_steps))[1]


def deviation(x, ref):
    """(relative RMS distance over the batch, the worst single image's): RMS(x - ref) / RMS(ref)."""
    err = (x - ref).pow(2).flatten(1).mean(1)  # (B,) per image
    return (err.mean() / ref.pow(2).mean()).sqrt().item(), (err / ref.pow(2).flatten(1).mean(1)).sqrt().max().item()


def spread(values, fmt=".4f"):
    """'mean ± sd' over the models (sample standard deviation), or the value alone for one model."""
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:{fmt}}"
    return f"{m:{fmt}} ± {(sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5:{fmt}}"


def timed_sample(model, device, autocast, *args, **kwargs):
    """(sample_loop's float32 result, seconds, its stats)."""
    stats = {}
    x, secs = timed(device, autocast, lambda: sample.sample_loop(model, *args, stats=stats, **kwargs))
    return x.float(), secs, stats


def eval_batch(model, shape, batch, device):
    """The batch the tables sample: noise of seed 1000 (not the calibration batch's seed 0), labels spread."""
    noise = sample.sample_noise(1000, range(batch), shape).to(device)
    return noise, torch.tensor([i * model.cfg.num_classes // batch for i in range(batch)], device=device)


def sharing_table(models, shape, device, precision, num_steps, ks, batch, cfg_scale, schedules, repeats=3):
    """For each budget k and each schedule in `schedules` (dp: the paper's cosine cost, dp-velocity: the
    velocity error, uniform): how far samples with encoder sharing land from unshared ones on the same noise
    (relative RMS difference over the batch, and of the worst image), both costs of the schedule, the
    wall-clock speedup (the fastest of `repeats` runs) against the ideal (the ratio of block evaluations,
    E * encoder images + D * decoder images: with guidance on an interval steps differ in batch size, so this
    is not always (E + D) N / (E k + D N)), and the calibration time as a fraction of the unshared sampling of
    the batch; each as mean ± sd over `models` (models of the same data and config, trained with other seeds).
    The velocity cost column is measured with no cap on reuse (so any schedule has one); the dp-velocity
    schedule comes from a matrix measured with reuse_cap(N, k), as sample.py measures it."""
    N = num_steps
    autocast = train.precision_context(device, precision)
    rows, notes = {}, []  # rows: (k, name) -> per model (cosine, velocity, dev, worst, speedup, ideal, calibration)
    for m, model in enumerate(models):
        E, D = model.cfg.encoder_depth, model.cfg.decoder_depth
        noise, y = eval_batch(model, shape, batch, device)

        def run(steps):  # (samples, fastest of `repeats` runs after a warm-up, block evaluations)
            timed_sample(model, device, autocast, noise[:2], y[:2], 3)
            runs = [timed_sample(model, device, autocast, noise, y, N, cfg_scale=cfg_scale, encoder_steps=steps)
                    for _ in range(repeats)]
            stats = runs[0][2]
            return runs[0][0], min(r[1] for r in runs), E * stats["encoder_evals"] + D * stats["decoder_evals"]

        def calibrate(fn, **k):  # (a cost matrix of fn on the seed-0 calibration batch, seconds)
            return timed(device, autocast, lambda: fn(model, N, shape, device=device, cfg_scale=cfg_scale, **k))

        ref, t_ref, work_ref = run(None)
        cos, t_cos = calibrate(sample.measure_sharing_cost)
        vel, t_vel = calibrate(sample.measure_velocity_cost)  # no cap: every schedule's velocity cost
        found = {}
        for k in ks:
            t_ref = min(t_ref, run(None)[1])  # the unshared time too is the fastest of all its runs
            plans = {"uniform": (sample.uniform_schedule(N, k), 0.0)}
            if "dp" in schedules:
                plans["dp"] = (sample.solve_sharing(cos, k), t_cos)
            if "dp-velocity" in schedules:
                capped, t_cap = calibrate(sample.measure_velocity_cost, max_reuse=sample.reuse_cap(N, k))
                plans["dp-velocity"] = (sample.solve_sharing(capped, k), t_cap)
                if plans["dp-velocity"][0] != sample.solve_sharing(vel, k):
                    notes.append(f"(K = {k}: the cap of {sample.reuse_cap(N, k)} steps changed the dp-velocity "
                                 f"schedule of model {m + 1})")
            for name in schedules:
                steps, t_cal = plans[name]
                x, t, work = run(steps)
                found[k, name] = (sample.sharing_cost(cos, steps), sample.sharing_cost(vel, steps), *deviation(x, ref),
                                  t, work_ref / work, t_cal, steps)
        for (k, name), (c_cos, c_vel, dev, worst, t, ideal, t_cal, steps) in found.items():
            rows.setdefault((k, name), []).append((c_cos, c_vel, dev, worst, t_ref / t, ideal, t_cal / t_ref, steps))
        print(f"model {m + 1}: unshared sampling of the batch: {t_ref:.2f}s; calibration "
              f"(batch 8): cosine {t_cos:.2f}s ({t_cos / t_ref:.2f}x), velocity without a cap {t_vel:.2f}s "
              f"({t_vel / t_ref:.2f}x)")
    if notes:
        print(*notes, sep="\n")
    print(f"| K of {N} | schedule | cosine cost | velocity cost | deviation (RMS) | worst image | speedup | ideal "
          f"| of ideal | calibration |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (k, name), per_model in rows.items():
        col = list(zip(*per_model))
        of_ideal = [s / i * 100 for s, i in zip(col[4], col[5])]
        print(f"| {k} | {name} | {spread(col[0])} | {spread(col[1])} | {spread(col[2])} | {spread(col[3])} | "
              f"{spread(col[4], '.2f')}x | {spread(col[5], '.2f')}x | {spread(of_ideal, '.0f')}% | "
              f"{spread(col[6], '.2f')}x |")
    for (k, name), per_model in rows.items():
        if name != "uniform":
            print(f"K = {k}, {name}: " + "; ".join(str(r[7]) for r in per_model))


SOLVERS = {"Euler": 1, "Adams-2": 2, "Adams-3": 3}  # name -> order of sample_loop


def frontier(models, shape, device, precision, step_counts, batch, cfg_scale, reference_steps=1000,
             reference_last_step=0.04):
    """The steps-versus-error frontier: for each solver (Euler, Adams-2, Adams-3) and N in `step_counts`,
    unshared and with the encoder at K = N / 2 steps (the DP schedule on the paper's cosine cost, measured
    along that solver's trajectory), the deviation of its samples from a `reference_steps` Euler sample on the
    same noise (relative RMS over the batch), against the block evaluations per image (E * encoder images +
    D * decoder images, counted by the sampler) and the wall-clock time of one run; mean ± sd over `models`
    (blocks: the mean). The solvers use the released grid (a last step of 0.04 whatever N is); the reference
    ends with a step of `reference_last_step`: 0.04 keeps that step's Euler error in the reference, a small
    one brings it closer to the exact ODE solution.
    Then, per solver, the cheapest setting (in block evaluations) whose mean deviation is at most Euler's
    at the largest N."""
    autocast = train.precision_context(device, precision)
    rows = {}  # (solver, N, K) -> per model (deviation, blocks per image, seconds)
    for m, model in enumerate(models):
        E, D = model.cfg.encoder_depth, model.cfg.decoder_depth
        noise, y = eval_batch(model, shape, batch, device)
        timed_sample(model, device, autocast, noise[:2], y[:2], 3)  # warm-up
        ref, secs, _ = timed_sample(model, device, autocast, noise, y, reference_steps, cfg_scale=cfg_scale,
                                    last_step=reference_last_step)
        print(f"model {m + 1}: the {reference_steps}-step Euler reference took {secs:.1f}s")
        for N in step_counts:
            for name, order in SOLVERS.items():
                for k in (N, N // 2):
                    steps = None
                    if k < N:
                        with autocast:
                            cost = sample.measure_sharing_cost(model, N, shape, device=device, order=order,
                                                               cfg_scale=cfg_scale)
                        steps = sample.solve_sharing(cost, k)
                    x, secs, stats = timed_sample(model, device, autocast, noise, y, N, order, cfg_scale=cfg_scale,
                                                  encoder_steps=steps)
                    blocks = (E * stats["encoder_evals"] + D * stats["decoder_evals"]) / batch
                    rows.setdefault((name, N, k), []).append((deviation(x, ref)[0], blocks, secs))
    print(f"reference: Euler, {reference_steps} steps, last step {reference_last_step}")
    print(f"| solver | N | K | blocks per image | deviation from Euler-{reference_steps} | time (s) |")
    print("|---|---|---|---|---|---|")
    for (name, N, k), per_model in rows.items():
        dev, blocks, secs = zip(*per_model)
        print(f"| {name} | {N} | {k if k < N else '-'} | {sum(blocks) / len(blocks):.0f} | {spread(dev)} | "
              f"{spread(secs, '.2f')} |")
    mean = {key: [sum(r[c] for r in v) / len(v) for c in range(2)] for key, v in rows.items()}  # deviation, blocks
    n_max = max(step_counts)
    target, base = mean["Euler", n_max, n_max]
    for name in SOLVERS:
        fits = [(mean[key][1], key) for key in rows if key[0] == name and mean[key][0] <= target]
        if fits:
            blocks, (_, N, k) = min(fits)
            print(f"{name}: the cheapest setting with a mean deviation at most Euler-{n_max}'s ({target:.4f}): N = {N}"
                  f"{f', K = {k}' if k < N else ''}, deviation {mean[name, N, k][0]:.4f}, {blocks:.0f} blocks per "
                  f"image ({base / blocks:.2f}x fewer than Euler-{n_max})")


def sde_check(models, shape, device, precision, num_steps, data_dir, per_class, cfg_scale):
    """A distribution-level check of the stochastic step rules (--sde) against the ODE: `per_class` samples of
    each class from each rule, each classified by its nearest image of the training set (1-NN, Euclidean, in
    the model's space: data_dir's latents.npy posterior means times the scaling factor); prints the share whose
    class is the one asked for, and the mean RMS distance to that nearest training image; mean ± sd over
    `models`. A first row gives the same for the training images themselves, each without itself (leave one
    out): how well the classifier does on real data, and how far apart real images are."""
    autocast = train.precision_context(device, precision)
    with open(os.path.join(data_dir, "meta.json")) as f:
        scale = json.load(f)["scaling_factor"]
    valid = np.load(os.path.join(data_dir, "valid.npy"))
    data = torch.from_numpy(np.load(os.path.join(data_dir, "latents.npy"), mmap_mode="r")[valid][:, 0]
                            .astype(np.float32)).flatten(1).to(device) * scale  # (n, C * h * w)
    labels = torch.from_numpy(np.load(os.path.join(data_dir, "labels.npy"))[valid]).to(device)

    def classify(x, y, skip=None):  # (% whose nearest training image has class y, mean RMS distance to it)
        found, dists = [], []
        for s in range(0, len(x), 1024):
            dist = torch.cdist(x[s: s + 1024], data)  # (rows, n)
            if skip is not None:  # leave one out: row r is training image skip[r]
                dist[torch.arange(len(dist)), skip[s: s + 1024]] = math.inf
            found.append(dist.min(1).indices)
            dists.append(dist.min(1).values)
        found, dists = torch.cat(found), torch.cat(dists)
        return (labels[found] == y).float().mean().item() * 100, (dists.pow(2) / x.shape[1]).sqrt().mean().item()

    rows = {"training images (leave one out)": [classify(data, labels, torch.arange(len(data), device=device))]}
    for model in models:
        y = torch.arange(model.cfg.num_classes, device=device).repeat_interleave(per_class)
        for rule in ("none", *sample.SDE_RULES):
            noise, gens = sample.image_noise(2000, range(len(y)), shape)
            x = timed_sample(model, device, autocast, noise.to(device), y, num_steps, 1, rule, gens,
                             cfg_scale=cfg_scale)[0].flatten(1)
            rows.setdefault("ode" if rule == "none" else rule, []).append(classify(x, y))
    print(f"| step rule (N = {num_steps}) | class of the nearest training image = class asked (%) | "
          f"RMS distance to it |")
    print("|---|---|---|")
    for rule, per_model in rows.items():
        agree, dist = zip(*per_model)
        print(f"| {rule} | {spread(agree, '.1f')} | {spread(dist)} |")


def heatmap(path, cost, k, title):
    """A PNG of the (N, N) cost matrix (1 - cos(z_i, z_j), row i reuses column j; colour on a square-root scale)
    with the encoder steps of two schedules of k runs marked where they pay: the DP's below the diagonal (white,
    column a from row a to the end of its segment), the uniform schedule's above it (red, the same transposed),
    and ticks at both schedules' steps on the margins."""
    N = len(cost)
    cell, top, left, bottom = max(2, 480 // N), 34, 14, 30
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)  # viridis
    level = np.sqrt(np.clip(cost / cost.max(), 0, 1)) * (len(anchors) - 1)  # (N, N) in [0, 4]
    lo = np.minimum(level.astype(int), len(anchors) - 2)
    rgb = anchors[lo] + (level - lo)[..., None] * (anchors[lo + 1] - anchors[lo])
    img = Image.new("RGB", (left + N * cell + 8, top + N * cell + bottom), "white")
    img.paste(Image.fromarray(rgb.astype(np.uint8)).resize((N * cell, N * cell), Image.NEAREST), (left, top))
    draw = ImageDraw.Draw(img)
    dp, uni = sample.solve_sharing(cost, k), sample.uniform_schedule(N, k)
    for steps, colour, below in ((dp, (255, 255, 255), True), (uni, (230, 30, 30), False)):
        for a, b in zip(steps, steps[1:] + [N]):  # the segment [a, b) reuses z_a
            c0, c1 = left + a * cell + cell // 2, top + a * cell + cell // 2
            end = (b - 1) * cell + cell // 2
            draw.line([(c0, c1), (c0, top + end)] if below else [(c0, c1), (left + end, c1)], fill=colour,
                      width=max(1, cell // 2))
            if below:
                draw.line([(c0, top - 5), (c0, top - 1)], fill=(0, 0, 0))  # DP ticks above the matrix
            else:
                draw.line([(left - 5, c1), (left - 1, c1)], fill=(230, 30, 30))  # uniform ticks left of it
    font = ImageFont.load_default()
    draw.text((left, 2), title, fill="black", font=font)
    draw.text((left, 14), f"1 - cos(z_i, z_j), max {cost.max():.3f} (yellow, square-root scale); K = {k}: DP white, "
              f"uniform red", fill="black", font=font)
    draw.text((left, top + N * cell + 4), f"row i = step reusing z, column j = step z comes from; "
              f"DP cost {sample.sharing_cost(cost, dp):.3f}, uniform {sample.sharing_cost(cost, uni):.3f}",
              fill="black", font=font)
    with ddt.atomic_write(path) as f:
        img.save(f, format="PNG")
    return dp, uni


def main():
    p = argparse.ArgumentParser(description="Time DDT training steps and sampling.",
                                formatter_class=ddt.HelpFormatter)
    train.add_model_args(p, default="DDT-S/2")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    p.add_argument("--image-size", type=int, default=32, help="latent height = width (32 = 256 px images)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the released implementation (default: on for CPU)")
    p.add_argument("--sample", action="store_true", help="time sampling instead of training")
    p.add_argument("--num-steps", type=int, nargs="+", default=[250], help="sampling steps (each in turn)")
    p.add_argument("--encoder-steps", type=int, nargs="+", default=[50], help="encoder runs K when sharing")
    p.add_argument("--ckpt", nargs="+", help="with --sample: trained nanoDDT checkpoints of one data set and config "
                   "(e.g. training seeds 0, 1, 2); tables give mean ± sd over them. Default: the sharing schedules")
    p.add_argument("--sharing", nargs="+", choices=("dp", "dp-velocity", "uniform"),
                   default=["dp", "dp-velocity", "uniform"], help="with --ckpt: the schedules compared")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="with --ckpt: guidance scale")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--frontier", action="store_true", help="with --ckpt: deviation against steps and time for "
                      "Euler, Adams-2, Adams-3, unshared and with K = N/2, at each --num-steps")
    mode.add_argument("--sde-check", metavar="DATA", help="with --ckpt: the --sde step rules against the ODE, "
                      "classified by the nearest image of the training set DATA (a prepare_latents.py folder)")
    mode.add_argument("--heatmap", metavar="PNG", help="with --ckpt: draw the first model's cosine cost matrix at the "
                      "first --num-steps, the DP's and the uniform schedule's first --encoder-steps marked")
    p.add_argument("--reference-steps", type=int, default=1000, help="--frontier: Euler steps of the reference")
    p.add_argument("--reference-last-step", type=float, default=0.04, help="--frontier: the reference's last step "
                   "(the samplers' grid ends with a step of 0.04 whatever N is; smaller is nearer the exact ODE)")
    p.add_argument("--repeats", type=int, default=3, help="sharing schedules: timed runs per setting, the fastest "
                   "counts")
    p.add_argument("--per-class", type=int, default=10, help="--sde-check: samples per class")
    args = p.parse_args()
    if (args.frontier or args.sde_check or args.heatmap) and not (args.sample and args.ckpt):
        raise SystemExit("error: --frontier, --sde-check and --heatmap need --sample --ckpt CKPT [CKPT ...]")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, _ = train.autocast_for(args, device)
    if args.sample and args.ckpt:  # trained models: sharing schedules, the frontier, the SDE check, the heatmap
        models, shapes = [], set()
        for path in args.ckpt:
            try:
                ckpt = ddt.load_checkpoint(path)
            except (OSError, ddt.CheckpointError) as e:
                raise SystemExit(f"--ckpt: {e}") from None
            models.append(ddt.load_ddt(path, ckpt=ckpt).to(device).eval())
            if not models[-1].cfg.decoder_depth:
                raise SystemExit(f"--ckpt {path} is an improved DiT (decoder_depth 0): no encoder to share")
            shapes.add(tuple(ckpt["data"]["latent_shape"]))
            print(f"{path}: {asdict(models[-1].cfg)}, latents {ckpt['data']['latent_shape']}, {precision}, "
                  f"batch {args.batch_size}")
        if len(shapes) > 1 or len({json.dumps(asdict(m.cfg)) for m in models}) > 1:
            raise SystemExit("error: the --ckpt models must share their config and latent shape (one data set)")
        shape = shapes.pop()
        if args.frontier:
            frontier(models, shape, device, precision, args.num_steps, args.batch_size, args.cfg_scale,
                     args.reference_steps, args.reference_last_step)
        elif args.heatmap:
            N, k = args.num_steps[0], args.encoder_steps[0]
            cost = sample.measure_sharing_cost(models[0], N, shape, device=device, cfg_scale=args.cfg_scale)
            dp, uni = heatmap(args.heatmap, cost, k, f"{args.ckpt[0]}: N = {N}, guidance {args.cfg_scale}")
            print(f"wrote {args.heatmap}; K = {k}: DP {dp}, uniform {uni}")
        else:
            for N in args.num_steps:
                if args.sde_check:
                    sde_check(models, shape, device, precision, N, args.sde_check, args.per_class, args.cfg_scale)
                else:
                    sharing_table(models, shape, device, precision, N, args.encoder_steps, args.batch_size,
                                  args.cfg_scale, list(dict.fromkeys(args.sharing)), args.repeats)
        return
    cfg = train.model_config(args, {"latent_shape": [args.channels, args.image_size, args.image_size],
                                    "num_classes": ddt.PRESETS[args.model].num_classes})
    shape = (args.channels, args.image_size, args.image_size)
    torch.manual_seed(0)
    model = ddt.DDT(cfg).to(device)
    flops = train.flops_per_image(cfg, args.image_size, args.image_size)
    peak = train.peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} {asdict(cfg)}\n{name}, {precision}{', compiled' if args.compile else ''}, batch "
          f"{args.batch_size}, latents {shape}, {flops / 1e9:.2f} GFLOPs per image forward")

    if args.sample:
        E, D = cfg.encoder_depth, cfg.decoder_depth
        model.eval()
        for N in args.num_steps:
            full = time_sampling(model, args.batch_size, shape, device, precision, N, None)
            if not D:  # the improved DiT: every step runs the whole network
                print(f"sampling {N} steps: {args.batch_size / full:.2f} images/s (an improved DiT: no encoder "
                      f"sharing)")
                continue
            for k in args.encoder_steps:
                shared = time_sampling(model, args.batch_size, shape, device, precision, N,
                                       sample.uniform_schedule(N, k))
                ideal = (E + D) * N / (E * k + D * N)
                print(f"sampling {N} steps: {args.batch_size / full:.2f} images/s; encoder at {k} steps: "
                      f"{args.batch_size / shared:.2f} images/s; speedup {full / shared:.2f}x (ideal {ideal:.2f}x, "
                      f"{full / shared / ideal:.0%} of it)")
        return

    compare = device.type == "cpu" if args.compare is None else args.compare
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rounds = {"nanoDDT": [], "released": []}
    for _ in range(3 if compare else 1):  # interleaved rounds, so drift hits both alike
        rounds["nanoDDT"].append(time_train(model, args.batch_size, shape, device, precision, args.compile,
                                            args.steps, args.warmup))
        if compare:
            with released_patchify():
                rounds["released"].append(time_train(as_released(model), args.batch_size, shape, device, precision,
                                                     args.compile, args.steps, args.warmup))
    # the floor: every FLOP at the rate of the model's MLP product on this device
    mlp = model.blocks[0].mlp.w1
    rate = matmul_rate(device, torch.bfloat16 if precision == "bf16" else torch.float32,
                       args.batch_size * (args.image_size // cfg.patch_size) ** 2, mlp.in_features, mlp.out_features)
    floor = 3 * flops * args.batch_size / rate
    print(f"matmul floor {floor * 1e3:8.1f} ms  (all {3 * flops * args.batch_size / 1e9:.0f} GFLOPs of the step at "
          f"this device's measured {rate / 1e12:.3f} TFLOP/s)")
    for impl, times in rounds.items():
        if not times:
            continue
        sec = sorted(times)[len(times) // 2]
        ips = args.batch_size / sec
        line = (f"{impl:9s} train step {sec * 1e3:8.1f} ms  {ips:8.1f} images/s  "
                f"{3 * flops * ips / 1e12:7.3f} TFLOP/s")
        if peak:
            line += f"  MFU {3 * flops * ips / peak:.1%}"
        print(line + f"  {sec / floor:.2f}x the floor")
    if compare:
        ratio = sorted(rounds["nanoDDT"])[1] / sorted(rounds["released"])[1]
        print(f"nanoDDT / released step time: {ratio:.2f}x")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
