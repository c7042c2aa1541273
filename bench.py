"""
Time a DDT training step and sampling, and compare with the released implementation's arithmetic.

    python bench.py                                        # CPU: DDT-S/2 (D 384, 8+4 blocks), batch 8
    python bench.py --model DDT-XL/2 --batch-size 32 --image-size 32 --precision bf16 --compile   # one GPU
    python bench.py --model DDT-XL/2 --batch-size 64 --sample --num-steps 250 --encoder-steps 50 --precision bf16

A training step is forward, backward, AdamW and the EMA update, on random data of the right shape. With
--compare (default on CPU) the same model is also timed with the released code's implementations of the
pieces nanoDDT rewrote (complex-number RoPE with float32 upcasts, RMSNorm as pow/mean/rsqrt, unfold/fold
patchify, float32 q/k norms), in the same process, interleaved, so the ratio is fair. Reports images/s,
model FLOPs per image, achieved TFLOP/s, MFU against the GPU's bf16 peak, peak memory, and each step time
against a floor: all of the step's FLOPs at the rate this device measures on the model's MLP product.
With --sample: images/s of Euler sampling, unshared and with the encoder at K evenly spread steps. (The
research measurements on trained models, the samplers' frontier and the sharing tables, are in experiments/.)
"""

import argparse
import copy
import time
import types
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.nn.functional as F

import ddt
import plumbing
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


def main():
    p = argparse.ArgumentParser(description="Time DDT training steps and sampling.",
                                formatter_class=plumbing.HelpFormatter)
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
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, _ = train.autocast_for(args, device)
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
