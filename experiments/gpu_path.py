"""
What the GPU path's defaults change, measured on the CPU where the CPU can show it (no GPU was lent): ratios and
counts in one process, so that the machine's load hits both sides of each comparison alike.

    python -m experiments.gpu_path --out assets/gpu_path      # ~5 min on 2 cores, under ~6 GiB of memory

1. One DDT-XL/2 decoder block, forward and backward under bf16 autocast at 256 tokens (one 256 px image):
   eager against torch.compile (inductor builds C++ on the CPU). Eager: every aten op that computes (views and
   allocations left out) and the bytes of its outputs, float32 ones apart. Compiled: inductor's generated
   kernels plus the matmuls and attention it leaves to aten (the bytes its kernels write cannot be counted here:
   a dispatch mode or the profiler makes dynamo run the block eagerly, and inductor's byte count is GPU-only).
   The milliseconds of both, the median of 5.
2. The gradient norm of an optimizer step with clipping off, on DDT-B/2's gradients: clip_grad_norm_(inf) (a norm
   and a multiply by 1.0 of every gradient) against nn.utils.get_total_norm (the norm only), in bytes touched and
   wall-clock time; the XL figures are the same bytes scaled to its 675M parameters.
3. train.py's data loader on an ImageNet-shaped memmap (4096 rows of 32 x 32 x 4 latents and 256 px images, in
   the page cache): ms a 32-image batch with the flips off and on, the old np.where flip against the new one.
4. A checkpoint's write: the CPU copy (what a step waits for with the background writer) against torch.save to
   the local disk, on DDT-B/2's whole state (model, EMA, AdamW: 2.1 GB), in GB/s.
"""

import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import ddt
import plumbing
import train

FREE = {"aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.expand", "aten.slice",
        "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.split", "aten.split_with_sizes", "aten.chunk",
        "aten.unbind", "aten.detach", "aten.alias", "aten.as_strided", "aten.empty", "aten.empty_strided",
        "aten.new_empty_strided", "aten._to_copy_noop", "aten.lift_fresh"}  # no arithmetic, nothing written


class Count(TorchDispatchMode):
    """Ops that compute and the bytes of their outputs (all, and float32 of 2 or more dimensions)."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes, self.fp32 = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t)]
        if name not in FREE:
            self.ops += 1
            if name.endswith("_") and args:  # in place (a foreach op's list too): the first argument is written
                tensors = [t for t in (args[0] if isinstance(args[0], (list, tuple)) else [args[0]])
                           if torch.is_tensor(t)]
            written = sum(t.numel() * t.element_size() for t in tensors)
            self.bytes += written
            self.fp32 += sum(t.numel() * 4 for t in tensors if t.dtype == torch.float32 and t.dim() >= 2)
        return out


EXTERN = ("aten.mm", "aten.addmm", "aten.bmm", "aten._scaled_dot_product_flash_attention_for_cpu",
          "aten._scaled_dot_product_flash_attention_for_cpu_backward")  # left to aten by inductor: extern kernels


def block_traffic(repeats=5):
    """Kernels and bytes written by one XL decoder block's forward and backward, eager and compiled, and ms."""
    torch.manual_seed(0)
    cfg = ddt.PRESETS["DDT-XL/2"]
    block = ddt.Block(cfg.hidden_size, cfg.num_heads)
    x = torch.randn(1, 256, cfg.hidden_size, requires_grad=True)
    z = torch.randn(1, 256, cfg.hidden_size)  # the decoder's per-token condition
    rope = ddt.rope_2d(cfg.hidden_size // cfg.num_heads, 16, 16, "cpu")

    def step(fn):
        with torch.autocast("cpu", torch.bfloat16):
            out = fn(x, z, rope)
        out.float().sum().backward()

    def ms(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(fn)
            times.append(time.perf_counter() - t0)
        return 1e3 * sorted(times)[repeats // 2]

    class Extern(Count):  # only the ops inductor leaves to aten
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += str(func.overloadpacket) in EXTERN
            return func(*args, **(kwargs or {}))

    with Count() as c:
        step(block)
    with Extern() as e:
        step(block)
    res = {"eager": dict(kernels=c.ops, bytes_written=c.bytes, float32_bytes_written=c.fp32, ms=ms(block))}
    from torch._inductor import metrics
    metrics.reset()
    compiled = torch.compile(block)
    step(compiled)  # compiles the forward and the backward
    res["compiled"] = dict(kernels=metrics.generated_kernel_count + e.ops, generated_kernels=
                           metrics.generated_kernel_count, extern_kernels=e.ops, ms=ms(compiled))
    return res


def grad_norm_cost():
    """clip_grad_norm_(inf) against get_total_norm on DDT-B/2's gradients: ops, bytes touched, ms."""
    torch.manual_seed(0)
    model = ddt.DDT(ddt.PRESETS["DDT-B/2"])
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    grad_bytes = sum(p.numel() * 4 for p in params)
    with torch.device("meta"):  # shapes only
        xl_bytes = sum(p.numel() for p in ddt.DDT(ddt.PRESETS["DDT-XL/2"]).parameters()) * 4
    ways = {"clip_grad_norm_(inf)": lambda: nn.utils.clip_grad_norm_(params, float("inf")),
            "get_total_norm": lambda: nn.utils.get_total_norm([p.grad for p in params])}
    res = {}
    for name, fn in ways.items():
        with Count() as c:
            norm = fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        touched = grad_bytes + 2 * c.bytes  # the norm reads every gradient; a write (the multiply's) is a read too
        res[name] = dict(ops=c.ops, bytes_written=c.bytes, bytes_touched=touched, ms=1e3 * sorted(times)[2],
                         norm=norm.item(), xl_bytes_touched=touched * xl_bytes // grad_bytes)
    res["grad_bytes"], res["xl_grad_bytes"] = grad_bytes, xl_bytes
    return res


def old_flip_batch(data, step):
    """The loader's batch as it was: np.where over every image, flipped or not, also with the flips off."""
    data.open()
    epoch, i = divmod(step, data.steps_per_epoch)
    if epoch != data.epoch:
        data.epoch, data.order = epoch, np.random.default_rng([data.seed, epoch]).permutation(data.valid)
    rows = data.order[i * data.batch:(i + 1) * data.batch][data.part]
    lat = train.read_rows(data.latents, rows).astype(np.float32)
    flip = np.zeros(len(rows), bool)
    if data.flipped is not None:
        flip = (np.random.default_rng([data.seed, step, 1]).random(data.batch) < 0.5)[data.part]
        lat[flip] = train.read_rows(data.flipped, rows[flip]).astype(np.float32)
    img = train.read_rows(data.images, rows)
    img = np.where(flip[:, None, None, None], img[:, :, ::-1], img)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(0, 3, 1, 2)


def loader_cost(folder, n=4096, batch=32):
    """ms a batch of train.LatentBatches on an ImageNet-shaped memmap, flips off and on, old and new flip."""
    rng = np.random.default_rng(0)
    np.lib.format.open_memmap(f"{folder}/latents.npy", "w+", np.float16, (n, 2, 4, 32, 32))[:] = \
        rng.standard_normal((n, 2, 4, 32, 32)).astype(np.float16)
    np.lib.format.open_memmap(f"{folder}/latents_flip.npy", "w+", np.float16, (n, 2, 4, 32, 32))[:] = 0
    images = np.lib.format.open_memmap(f"{folder}/images.npy", "w+", np.uint8, (n, 256, 256, 3))
    for a in range(0, n, 512):
        images[a:a + 512] = rng.integers(0, 256, (min(512, n - a), 256, 256, 3), dtype=np.uint8)
    images.flush()
    np.save(f"{folder}/labels.npy", np.arange(n) % 1000)
    np.save(f"{folder}/valid.npy", np.ones(n, bool))
    res = {}
    for flip in (False, True):
        with open(f"{folder}/meta.json", "w") as f:
            json.dump({"flip": flip, "has_images": True, "latent_shape": [4, 32, 32]}, f)
        data = train.LatentBatches(folder, batch, 0, 1, 0, need_images=True)
        for s in range(n // batch):  # once through: everything in the page cache
            data[s]
        for name, fn in (("old", lambda s: old_flip_batch(data, s)), ("new", lambda s: data[s])):
            t0 = time.perf_counter()
            for s in range(n // batch):
                fn(s)
            res[f"flips {'on' if flip else 'off'}, {name}"] = 1e3 * (time.perf_counter() - t0) / (n // batch)
    return res


def checkpoint_cost(folder):
    """GB/s of the CPU copy a step waits for, and of torch.save to the local disk, on DDT-B/2's whole state."""
    torch.manual_seed(0)
    model = ddt.DDT(ddt.PRESETS["DDT-B/2"])
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": opt.state_dict()}
    gb = sum(t.numel() * t.element_size() for t in state["model"].values()) * 4 / 1e9  # model, EMA, 2 moments
    plumbing.cpu_copy(state)  # a warm-up: the timed copy below is not the first
    t0 = time.perf_counter()
    copy = plumbing.cpu_copy(state)
    t_copy = time.perf_counter() - t0
    t0 = time.perf_counter()
    plumbing.save_atomic(copy, f"{folder}/ckpt.pt")
    t_save = time.perf_counter() - t0
    return dict(gigabytes=gb, copy_s=t_copy, save_s=t_save, copy_gb_s=gb / t_copy, save_gb_s=gb / t_save)


def main(argv=None):
    p = plumbing.ArgumentParser("The GPU path's defaults, measured on the CPU.")
    p.add_argument("--out", required=True, help="folder for gpu_path.json and gpu_path.md")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    res = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        res["loader_ms_per_batch"] = loader_cost(tmp)
        res["checkpoint"] = checkpoint_cost(tmp)
    res["grad_norm"] = grad_norm_cost()
    res["block"] = block_traffic()
    with plumbing.atomic_write(os.path.join(args.out, "gpu_path.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
