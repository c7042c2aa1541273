"""
Benchmark a DDT training step and sampling, and compare with the released implementation's arithmetic.

    python bench.py                                        # CPU: the issue's config (D 384, 8+4 blocks, batch 8)
    python bench.py --model DDT-XL/2 --batch-size 32 --image-size 32 --precision bf16 --compile   # one GPU
    python bench.py --model DDT-XL/2 --batch-size 64 --sample --num-steps 250 --encoder-steps 50 --precision bf16
    python bench.py --sample --ckpt runs/toy/ckpt.pt --num-steps 100 --encoder-steps 10 25 50 --batch-size 32 \\
        --cfg-scale 3.0 --sharing dp dp-velocity uniform    # sharing schedules side by side on a trained model

A training step is forward, backward, AdamW and the EMA update, on random data of the right shape. With
--compare (default on CPU) the same model is also timed with the released code's implementations of the
pieces nanoDDT rewrote (complex-number RoPE with float32 upcasts, RMSNorm as pow/mean/rsqrt, unfold/fold
patchify, float32 q/k norms), in the same process, interleaved, so the ratio is fair. Reports images/s,
model FLOPs per image, achieved TFLOP/s, MFU against the GPU's bf16 peak, peak memory, and each step time
against a floor: all of the step's FLOPs at the rate this device measures on the model's MLP product.
"""

import argparse
import copy
import time
import types
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F

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
    autocast = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else nullcontext()
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


def time_sampling(model, batch, shape, device, precision, num_steps, encoder_steps):
    """Seconds for one batch of `num_steps` Euler steps (no guidance), encoder at `encoder_steps`."""
    autocast = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else nullcontext()
    noise = torch.randn(batch, *shape, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with autocast:
        sample.euler_sample(model, noise, y, num_steps=min(num_steps, 5))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        sample.euler_sample(model, noise, y, num_steps=num_steps, encoder_steps=encoder_steps)
        sync(device)
    return time.perf_counter() - t0


def sharing_table(model, shape, device, precision, num_steps, ks, batch, cfg_scale, schedules):
    """For each budget k and each schedule in `schedules` (dp: the paper's cosine cost, dp-velocity: the
    velocity error, uniform): how far samples with encoder sharing land from unshared ones on the same noise
    (relative RMS difference over the batch, and of the worst image), both costs of the schedule, the
    wall-clock speedup against the ideal (the ratio of block evaluations, E * encoder images + D * decoder
    images: with guidance on an interval steps differ in batch size, so this is not always
    (E + D) N / (E k + D N)), and the calibration time as a fraction of the unshared sampling of the batch.
    The velocity cost column is measured with no cap on reuse (so any schedule has one); the dp-velocity
    schedule comes from a matrix measured with reuse_cap(N, k), as sample.py measures it."""
    E, D, N = model.cfg.encoder_depth, model.cfg.decoder_depth, num_steps
    autocast = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else nullcontext()
    noise = sample.sample_noise(1000, range(batch), shape).to(device)  # not the calibration batch's noise
    y = torch.tensor([i * model.cfg.num_classes // batch for i in range(batch)], device=device)
    kw = dict(num_steps=N, cfg_scale=cfg_scale)

    def run(steps, repeats=3):  # (samples, fastest of `repeats` runs after a warm-up, block evaluations)
        times, stats = [], {}
        with autocast:
            sample.euler_sample(model, noise[:2], y[:2], num_steps=3)
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                stats = {}
                x = sample.euler_sample(model, noise, y, encoder_steps=steps, stats=stats, **kw).float()
                sync(device)
                times.append(time.perf_counter() - t0)
        return x, min(times), E * stats["encoder_evals"] + D * stats["decoder_evals"]

    def timed(fn, *a, **k):  # (result, seconds)
        with autocast:
            sync(device)
            t0 = time.perf_counter()
            out = fn(model, N, shape, *a, device=device, cfg_scale=cfg_scale, **k)
            sync(device)
        return out, time.perf_counter() - t0

    ref, t_ref, work_ref = run(None)
    cos, t_cos = timed(sample.measure_sharing_cost)  # seed-0 calibration batch
    vel, t_vel = timed(sample.measure_velocity_cost)  # no cap: every schedule's velocity cost
    rows, chosen = [], {}
    for k in ks:
        t_ref = min(t_ref, run(None)[1])  # the unshared time too is the fastest of all its runs
        plans = {"uniform": (sample.uniform_schedule(N, k), 0.0)}
        if "dp" in schedules:
            plans["dp"] = (sample.solve_sharing(cos, k), t_cos)
        if "dp-velocity" in schedules:
            capped, t_cap = timed(sample.measure_velocity_cost, max_reuse=sample.reuse_cap(N, k))
            plans["dp-velocity"] = (sample.solve_sharing(capped, k), t_cap)
            if plans["dp-velocity"][0] != sample.solve_sharing(vel, k):
                print(f"(K = {k}: the cap of {sample.reuse_cap(N, k)} steps changed the dp-velocity schedule)")
        for name in schedules:
            steps, t_cal = plans[name]
            x, t, work = run(steps)
            err = (x - ref).pow(2).flatten(1).mean(1)  # (B,) per image
            dev = (err.mean() / ref.pow(2).mean()).sqrt().item()
            worst = (err / ref.pow(2).flatten(1).mean(1)).sqrt().max().item()
            rows.append((k, name, sample.sharing_cost(cos, steps), sample.sharing_cost(vel, steps), dev, worst, t,
                         work, t_cal))
            chosen[k, name] = steps
    print(f"unshared sampling of the batch: {t_ref:.2f}s; calibration (batch 8): cosine {t_cos:.2f}s "
          f"({t_cos / t_ref:.2f}x), velocity without a cap {t_vel:.2f}s ({t_vel / t_ref:.2f}x)")
    print(f"| K of {N} | schedule | cosine cost | velocity cost | deviation (RMS) | worst image | speedup | ideal "
          f"| of ideal | calibration |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, name, c_cos, c_vel, dev, worst, t, work, t_cal in rows:
        print(f"| {k} | {name} | {c_cos:.4f} | {c_vel:.4f} | {dev:.4f} | {worst:.4f} | {t_ref / t:.2f}x | "
              f"{work_ref / work:.2f}x | {t_ref / t / (work_ref / work):.0%} | {t_cal / t_ref:.2f}x |")
    for (k, name), steps in chosen.items():
        if name != "uniform":
            print(f"K = {k}, {name}: {steps}")


def main():
    p = argparse.ArgumentParser(description="Time DDT training steps and sampling.")
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
    p.add_argument("--num-steps", type=int, default=250, help="sampling steps")
    p.add_argument("--encoder-steps", type=int, nargs="+", default=[50], help="encoder runs K when sharing")
    p.add_argument("--ckpt", help="with --sample: a trained nanoDDT checkpoint; compares sharing schedules")
    p.add_argument("--sharing", nargs="+", choices=("dp", "dp-velocity", "uniform"),
                   default=["dp", "dp-velocity", "uniform"], help="with --ckpt: the schedules compared")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="with --ckpt: guidance scale")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.sample and args.ckpt:  # the sharing schedules side by side on a trained model
        try:
            ckpt = ddt.load_checkpoint(args.ckpt)
        except (OSError, ddt.CheckpointError) as e:
            raise SystemExit(f"--ckpt: {e}") from None
        model, shape = ddt.load_ddt(args.ckpt, ckpt=ckpt).to(device), tuple(ckpt["data"]["latent_shape"])
        if not model.cfg.decoder_depth:
            raise SystemExit(f"--ckpt {args.ckpt} is an improved DiT (decoder_depth 0): no encoder to share")
        print(f"{args.ckpt}: {asdict(model.cfg)}, latents {shape}, {precision}, batch {args.batch_size}")
        sharing_table(model, shape, device, precision, args.num_steps, args.encoder_steps, args.batch_size,
                      args.cfg_scale, list(dict.fromkeys(args.sharing)))
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
        N, E, D = args.num_steps, cfg.encoder_depth, cfg.decoder_depth
        model.eval()
        full = time_sampling(model, args.batch_size, shape, device, precision, N, None)
        if not D:  # the improved DiT: every step runs the whole network
            print(f"sampling {N} steps: {args.batch_size / full:.2f} images/s (an improved DiT: no encoder sharing)")
            return
        for k in args.encoder_steps:
            shared = time_sampling(model, args.batch_size, shape, device, precision, N, sample.uniform_schedule(N, k))
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
