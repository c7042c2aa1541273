"""
Time a DDT training step and sampling, and compare with the released implementation's arithmetic.

    python bench.py                                        # CPU: DDT-S/2 (D 384, 8+4 blocks), batch 8
    python bench.py --model DDT-XL/2 --batch-size 32 --image-size 32 --precision bf16 --compile   # one GPU
    python bench.py --model DDT-XL/2 --batch-size 64 --sample --num-steps 250 --encoder-steps 50 --precision bf16
    python bench.py --model DDT-XL/2 --batch-size 2 --precision bf16 --repa --memory   # CPU: 16 GiB of memory
    python bench.py --model DDT-XL/2 --events --num-steps 50     # the sample grid and a checkpoint's write

A training step is forward, backward, AdamW and the EMA update, on random data of the right shape. With
--compare (default on CPU) the same model is also timed with the released code's implementations of the
pieces nanoDDT rewrote (complex-number RoPE with float32 upcasts, RMSNorm as pow/mean/rsqrt, unfold/fold
patchify, float32 q/k norms), in the same process, interleaved, so the ratio is fair. Reports images/s,
model FLOPs per image, achieved TFLOP/s, MFU against the GPU's bf16 peak, peak memory, and each step time
against a floor: all of the step's FLOPs at the rate this device measures on the model's MLP product.
--repa adds REPA's teacher (DINOv2-B/14's shapes, random weights) to the step; its FLOPs count in the MFU.
--memory makes one step and counts its memory instead of timing: the bytes of the weights, gradients, AdamW
moments, EMA and teacher, what autograd saves for the backward pass, and the step's peak (experiments/memory.py
turns these into the table of what fits a GPU).
With --sample: images/s of Euler sampling, unshared and with the encoder at K evenly spread steps. (The
research measurements on trained models, the samplers' frontier and the sharing tables, are in experiments/.)
"""

import argparse
import copy
import os
import tempfile
import time
import types
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F

import ddt
import plumbing
import pretrained
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
    q, k = self.q_norm(q), self.k_norm(k)  # released RMSNorm (float32 inside, times the float32 weight)
    cis = torch.complex(rope[0], rope[1])[None, :, None]  # (1, N, 1, d/2): the released freqs_cis, N x d/2 numbers
    q2 = torch.view_as_real(torch.view_as_complex(q.float().reshape(B, N, self.num_heads, -1, 2)) * cis)
    k2 = torch.view_as_real(torch.view_as_complex(k.float().reshape(B, N, self.num_heads, -1, 2)) * cis)
    q, k = q2.flatten(3).type_as(q).transpose(1, 2), k2.flatten(3).type_as(k).transpose(1, 2)  # apply_rotary_emb
    x = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))  # (B, nh, N, d)
    return self.proj(x.transpose(1, 2).reshape(B, N, D))


def as_released(model):
    """A copy of `model` whose RMSNorms and attentions compute as the released code does (timing only)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, ddt.RMSNorm):
            m.forward = types.MethodType(released_rmsnorm, m)
        elif isinstance(m, ddt.Attention):
            m.forward = types.MethodType(released_attention, m)
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


def random_teacher(device):
    """REPA's teacher with DINOv2-B/14's shapes (width 768, 12 blocks) and random weights: its cost, not its use."""
    torch.manual_seed(1)
    return pretrained.DINOv2(768, 12).to(device).eval().requires_grad_(False)


class TrainStep:
    """train.py's optimizer step at one rank, on random data of the right shape: the same functions, imported
    (train.step_inputs, train.train_step, train.update_ema), with the paper's settings. REPA: with a teacher, on
    8x-upscaled images as an SD-VAE dataset has them. Calling it makes one step and returns the loss."""

    def __init__(self, model, batch, shape, device, precision, compile=False, teacher=None):
        cfg = model.cfg
        self.student = train.ModelWithProjector(model, teacher.embed_dim if teacher else 0,
                                                min(8, cfg.encoder_depth)).to(device)
        self.ema = copy.deepcopy(model).float().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0,
                                     fused=True)  # as train.build makes it
        self.model = torch.compile(self.student) if compile else self.student
        self.teacher, self.device, self.step = teacher, device, 0
        self.args = types.SimpleNamespace(seed=0, global_batch_size=batch, class_dropout=0.1, precision=precision,
                                          grad_accum=1, repa_weight=0.5, grad_clip=0.0, out_dir="(bench)")
        self.data = types.SimpleNamespace(part=slice(None), meta={"latent_shape": shape, "scaling_factor": 1.0,
                                                                  "num_classes": cfg.num_classes})
        gen = torch.Generator(device).manual_seed(0)
        self.batch = {"mean": torch.randn(batch, *shape, device=device, generator=gen),
                      "std": torch.full((batch, *shape), 0.05, device=device),
                      "y": torch.randint(0, cfg.num_classes, (batch,), device=device, generator=gen)}
        if teacher is not None:
            self.batch["images"] = torch.randint(0, 256, (batch, 3, 8 * shape[1], 8 * shape[2]), dtype=torch.uint8,
                                                 device=device, generator=gen)

    def __call__(self):
        inputs = train.step_inputs(self.batch, self.step, self.data, self.teacher, self.args, self.device)
        parts = train.train_step(self.model, self.opt, inputs, self.args)  # loss, fm, repa, grad norm
        self.step += 1
        train.update_ema(self.ema, self.student.model, 0.9999)
        return parts[0]


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def reset_peak(device):
    """Start the device's peak-memory count afresh: the CUDA allocator's, or Linux's VmHWM of this process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
        except OSError:
            pass


def peak_memory(device):
    """Bytes at the peak since reset_peak: CUDA's allocated, or this process's resident (VmHWM); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def describe_peak(n, device):
    return f"{n / 2 ** 30:.2f} GiB ({'allocated by CUDA' if device.type == 'cuda' else 'resident: the whole process'})"


def step_memory(step):
    """A step of a TrainStep to warm up (AdamW makes its moments in the first), then one counted: {"loss",
    "seconds", "peak": the device's peak memory in that step (peak_memory), the bytes of the state a run keeps
    ("weights", "gradients", "adamw", "ema", "teacher") and "activations": what autograd saves in the step for its
    backward pass (distinct storages, the weights' own left out; under bf16 autocast it includes the weights'
    bf16 copies)}."""
    params = list(step.student.parameters())
    own = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    step()
    sync(step.device)
    reset_peak(step.device)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    sync(step.device)
    return {"loss": loss.item(), "seconds": time.perf_counter() - t0, "peak": peak_memory(step.device),
            "weights": nbytes(params), "gradients": nbytes(p for p in params if p.requires_grad),
            "adamw": nbytes(v for s in step.opt.state.values() for v in s.values() if v.numel() > 1),
            "ema": nbytes(step.ema.parameters()),
            "teacher": nbytes(step.teacher.parameters()) if step.teacher is not None else 0,
            "activations": sum(saved.values())}


def print_memory(rec, batch, device):
    """step_memory's record as two lines, in GiB."""
    gb = {k: rec[k] / 2 ** 30 for k in ("weights", "gradients", "adamw", "ema", "teacher", "activations")}
    state = sum(v for k, v in gb.items() if k != "activations")
    print(f"loss {rec['loss']:.4f} in {rec['seconds']:.1f} s; state {state:.2f} GiB (weights {gb['weights']:.2f}, "
          f"gradients {gb['gradients']:.2f}, AdamW {gb['adamw']:.2f}, EMA {gb['ema']:.2f}, teacher "
          f"{gb['teacher']:.2f}); saved for backward {gb['activations']:.2f} GiB ({gb['activations'] / batch:.2f} a "
          f"image at batch {batch})")
    if rec["peak"]:
        print(f"peak memory in that step {describe_peak(rec['peak'], device)}")


def time_train(step, device, steps, warmup):
    """Seconds per training step (median of `steps`) of a TrainStep."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
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
    autocast = plumbing.autocast(device, precision)
    noise = torch.randn(batch, *shape, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with autocast:
        sample.sample_loop(model, noise, y, sample.Sampler(min(num_steps, 5)))  # warm-up
    return timed(device, autocast, lambda: sample.sample_loop(model, noise, y, sample.Sampler(num_steps),
                                                              encoder_steps))[1]


def bench_sampling(model, args, shape, device, precision):
    """--sample: images/s of Euler sampling at each --num-steps, unshared and with the encoder at each K."""
    E, D = model.cfg.encoder_depth, model.cfg.decoder_depth
    model.eval()
    for N in args.num_steps:
        full = time_sampling(model, args.batch_size, shape, device, precision, N, None)
        if not D:  # the improved DiT: every step runs the whole network
            print(f"sampling {N} steps: {args.batch_size / full:.2f} images/s (an improved DiT: no encoder sharing)")
            continue
        for k in args.encoder_steps:
            shared = time_sampling(model, args.batch_size, shape, device, precision, N, sample.uniform_schedule(N, k))
            ideal = (E + D) * N / (E * k + D * N)
            print(f"sampling {N} steps: {args.batch_size / full:.2f} images/s; encoder at {k} steps: "
                  f"{args.batch_size / shared:.2f} images/s; speedup {full / shared:.2f}x (ideal {ideal:.2f}x, "
                  f"{full / shared / ideal:.0%} of it)")


def bench_training(model, args, shape, device, precision, teacher):
    """Median training-step time, images/s, TFLOP/s, MFU and the distance to the matmul floor; with --compare,
    interleaved with the released arithmetic's."""
    peak = plumbing.peak_flops(device)
    compare = device.type == "cpu" if args.compare is None else args.compare
    steps = {"nanoDDT": TrainStep(model, args.batch_size, shape, device, precision, args.compile, teacher)}
    meta = {"latent_shape": shape, "resolution": 8 * args.image_size}  # an SD-VAE dataset's
    flops = train.training_flops(steps["nanoDDT"].student, teacher, meta)  # a training image, as train.py counts
    if compare:
        steps["released"] = TrainStep(as_released(model), args.batch_size, shape, device, precision, args.compile,
                                      teacher)
    reset_peak(device)
    rounds = {impl: [] for impl in steps}
    for _ in range(3 if compare else 1):  # interleaved rounds, so drift hits both alike
        for impl, step in steps.items():
            with released_patchify() if impl == "released" else nullcontext():
                rounds[impl].append(time_train(step, device, args.steps, args.warmup))
    # the floor: every FLOP at the rate of the model's MLP product on this device
    mlp = model.blocks[0].mlp.w1
    rate = matmul_rate(device, torch.bfloat16 if precision == "bf16" else torch.float32,
                       args.batch_size * (args.image_size // model.cfg.patch_size) ** 2, mlp.in_features,
                       mlp.out_features)
    floor = flops * args.batch_size / rate
    print(f"matmul floor {floor * 1e3:8.1f} ms  (all {flops * args.batch_size / 1e9:.0f} GFLOPs of the step at "
          f"this device's measured {rate / 1e12:.3f} TFLOP/s)")
    for impl, times in rounds.items():
        sec = sorted(times)[len(times) // 2]
        ips = args.batch_size / sec
        line = f"{impl:9s} train step {sec * 1e3:8.1f} ms  {ips:8.1f} images/s  {flops * ips / 1e12:7.3f} TFLOP/s"
        if peak:
            line += f"  MFU {flops * ips / peak:.1%}"
        print(line + f"  {sec / floor:.2f}x the floor")
    if compare:
        print(f"nanoDDT / released step time: {sorted(rounds['nanoDDT'])[1] / sorted(rounds['released'])[1]:.2f}x")
    if mem := peak_memory(device):
        print(f"peak memory {describe_peak(mem, device)}")


def bench_events(model, args, shape, device, precision):
    """--events: what a run does besides its steps, at this size: train.py's sample grid (80 images of --num-steps
    Euler steps under the run's precision, decoded by an SD-VAE with random weights) and a checkpoint (the model,
    its EMA and AdamW: the CPU copy the step waits for, then the write the background thread does)."""
    meta = {"num_classes": model.cfg.num_classes, "latent_shape": list(shape), "scaling_factor": 1.0}
    vae = pretrained.AutoencoderKL().to(device).eval() if shape[0] == 4 else None
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):  # the second is timed
            _, secs = timed(device, nullcontext(), lambda: sample.class_grid(
                model, vae, meta, f"{tmp}/grid.png", num_steps=args.num_steps[0], precision=precision))
        print(f"sample grid: 80 images, {args.num_steps[0]} steps{', decoded' if vae else ''}: {secs:.1f} s")
        step = TrainStep(model, 1, shape, device, precision)
        step()  # AdamW's moments exist after a step
        state = {"model": model.state_dict(), "ema": step.ema.state_dict(), "optimizer": step.opt.state_dict()}
        writer = plumbing.CheckpointWriter()
        _, copy = timed(device, nullcontext(), lambda: writer.save(state, [f"{tmp}/ckpt.pt"]))
        _, write = timed(device, nullcontext(), writer.join)
        gb = os.path.getsize(f"{tmp}/ckpt.pt") / 1e9
        print(f"checkpoint: {gb:.1f} GB; the CPU copy a step waits for {copy:.1f} s, the write after it {write:.1f} s "
              f"({gb / write:.2f} GB/s to {tempfile.gettempdir()})")


def main():
    p, positive = plumbing.ArgumentParser("Time DDT training steps and sampling."), plumbing.number(int, 1)
    train.add_model_args(p, default="DDT-S/2")
    p.add_argument("--channels", type=positive, default=4, help="latent channels")
    p.add_argument("--image-size", type=positive, default=32, help="latent height = width (32 = 256 px images)")
    p.add_argument("--batch-size", type=positive, default=8)
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the step")
    p.add_argument("--steps", type=positive, default=10, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=plumbing.number(int, 0), default=3)
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the released implementation (default: on for CPU)")
    p.add_argument("--repa", action="store_true", help="with REPA: a DINOv2-B/14-shaped teacher, random weights")
    p.add_argument("--memory", action="store_true",
                   help="one training step, its memory counted (weights, gradients, AdamW, EMA, activations)")
    p.add_argument("--sample", action="store_true", help="time sampling instead of training")
    p.add_argument("--events", action="store_true", help="time train.py's sample grid and a checkpoint instead")
    p.add_argument("--num-steps", type=positive, nargs="+", default=[250], help="sampling steps (each in turn)")
    p.add_argument("--encoder-steps", type=positive, nargs="+", default=[50], help="encoder runs K when sharing")
    args = p.parse_args()
    if args.repa and (args.patch_size or ddt.PRESETS[args.model].patch_size) != 2:
        p.error("--repa needs patch size 2 (as many DINOv2 tokens as DDT tokens, with latents 1/8 of the images)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    shape = (args.channels, args.image_size, args.image_size)
    cfg = train.model_config(args, {"latent_shape": list(shape), "num_classes": ddt.PRESETS[args.model].num_classes})
    torch.manual_seed(0)
    model = ddt.DDT(cfg).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} {asdict(cfg)}\n{name}, {precision}{', compiled' if args.compile else ''}, batch "
          f"{args.batch_size}, latents {shape}, {ddt.flops_per_image(cfg, *shape[1:]) / 1e9:.2f} GFLOPs per image "
          f"forward")
    if args.sample:
        return bench_sampling(model, args, shape, device, precision)
    if args.events:
        return bench_events(model, args, shape, device, precision)
    teacher = random_teacher(device) if args.repa else None
    if args.memory:
        step = TrainStep(model, args.batch_size, shape, device, precision, args.compile, teacher)
        return print_memory(step_memory(step), args.batch_size, device)
    bench_training(model, args, shape, device, precision, teacher)


if __name__ == "__main__":
    main()
