"""
The memory of a DDT-XL/2 and an iDiT-XL/2 training step at 256 px, measured on the CPU, and what it predicts for
one GPU. Each case is bench.py's TrainStep (train.py's step: flow matching, REPA to a DINOv2-B/14-shaped teacher
with random weights, AdamW, EMA) at one micro-batch and precision, counted by bench.step_memory in a fresh process
after a warm-up step: the bytes of the state a run keeps, what autograd saves for the backward pass, the loss and
the process's peak resident memory.

    python -m experiments.memory --out assets/memory      # ~10 min on 2 cores, 16 GiB of memory at the most

Writes OUT/memory.json (each case as measured; a rerun skips the cases already there) and OUT/memory.md: per model
and precision, the state, the activations as a fixed part plus a part per image (a line through micro-batches 1
and 2, checked against micro-batch 4), the predicted peak at the paper's 32 images per GPU, and the largest
micro-batch whose predicted peak fits the memory of the lent H100 and H200 (about 78 and 139 GiB). The prediction
adds the state and all of the step's activations, as at the start of the backward pass with the gradients already
allocated (DDP keeps them between steps); it leaves out the CUDA context, cuBLAS and NCCL workspaces and the
allocator's fragmentation, and the CPU's attention and autocast kernels save what CUDA's would only up to details.
"""

import json
import multiprocessing
import os

import torch

import bench
import ddt
import plumbing

MODELS = ("DDT-XL/2", "iDiT-XL/2")
CASES = [(m, p, b) for m in MODELS for p in ("bf16", "fp32") for b in (1, 2)] + [(m, "bf16", 4) for m in MODELS]
GPUS = {"H100 (78 GiB)": 78, "H200 (139 GiB)": 139}  # what the lent cards offer, GiB
GIB = 2 ** 30


def measure(model, precision, batch, image_size, grad_checkpoint=False):
    """One case in this process: bench.step_memory of a TrainStep, and the parameters' count."""
    torch.manual_seed(0)
    net = ddt.DDT(ddt.PRESETS[model])
    net.grad_checkpoint = grad_checkpoint
    device = torch.device("cpu")
    step = bench.TrainStep(net, batch, (4, image_size, image_size), device, precision,
                           teacher=bench.random_teacher(device))
    return bench.step_memory(step) | {"params": sum(p.numel() for p in net.parameters())}


def fit(results, model, precision, tag=""):
    """(state bytes, fixed activation bytes, activation bytes per image) from micro-batches 1 and 2. With
    --grad-checkpoint (tag " gc") the step keeps the blocks' inputs, and its backward pass recomputes one block's
    activations at a time on top of them: a block's share of the activations without checkpointing is added."""
    one, two = (results[f"{model} {precision} {b}{tag}"] for b in (1, 2))
    state = sum(one[k] for k in ("weights", "gradients", "adamw", "ema", "teacher"))
    per_image = two["activations"] - one["activations"]
    fixed = one["activations"] - per_image
    if tag:
        cfg = ddt.PRESETS[model]
        _, plain_fixed, plain_per_image = fit(results, model, precision)
        fixed += plain_fixed / (cfg.encoder_depth + cfg.decoder_depth)
        per_image += plain_per_image / (cfg.encoder_depth + cfg.decoder_depth)
    return state, fixed, per_image


def table(results, per_gpu):
    """The markdown summary of memory.json's cases; the prediction at `per_gpu` images a GPU (the paper's)."""
    lines = [f"| model | precision | parameters | state (weights, gradients, AdamW, EMA, teacher) | activations: fixed "
             f"+ per image | predicted at {per_gpu} images | " + " | ".join(f"largest micro-batch, {g}" for g in GPUS)
             + " |", "|---|---|---|---|---|---|" + "---|" * len(GPUS)]
    for model, precision, tag in dict.fromkeys((*n.split()[:2], " gc" if n.endswith(" gc") else "") for n in results):
        state, fixed, per_image = fit(results, model, precision, tag)
        params = results[f"{model} {precision} 1{tag}"]["params"]
        fits = [int((cap * GIB - state - fixed) // per_image) for cap in GPUS.values()]
        lines.append(f"| {model}{', --grad-checkpoint' if tag else ''} | {precision} | {params / 1e6:.1f}M | "
                     f"{state / GIB:.2f} GiB | {fixed / GIB:.2f} + {per_image / GIB:.3f} GiB | "
                     f"{(state + fixed + per_gpu * per_image) / GIB:.1f} GiB | " + " | ".join(map(str, fits)) + " |")
    lines += ["", "Each case as measured (one step after a warm-up, CPU, GiB): predicted = state + activations (with "
              "--grad-checkpoint, + one block's recomputed activations); the peak is the whole process's resident "
              "memory in that step.", "",
              "| case | loss | seconds | activations saved | predicted | peak resident |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        model, precision, batch, *tag = name.split()
        state, fixed, per_image = fit(results, model, precision, " gc" if tag else "")
        predicted = state + fixed + int(batch) * per_image
        lines.append(f"| {name} | {r['loss']:.4f} | {r['seconds']:.1f} | {r['activations'] / GIB:.3f} | "
                     f"{predicted / GIB:.2f} | {r['peak'] / GIB:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = plumbing.ArgumentParser("Memory of DDT-XL/2 and iDiT-XL/2 training steps (CPU), and the "
                                "micro-batches that fit one GPU.")
    p.add_argument("--out", required=True, help="folder for memory.json and memory.md")
    p.add_argument("--image-size", type=int, default=32, help="latent height = width (32: 256 px images)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="the models measured")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--grad-checkpoint", action="store_true", help="also the cases with train.py --grad-checkpoint")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "memory.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    if results.get("image_size", args.image_size) != args.image_size:
        raise SystemExit(f"{path} holds cases at --image-size {results['image_size']}: use another --out")
    results["image_size"] = args.image_size
    spawn = multiprocessing.get_context("spawn")  # a fresh process a case: its peak is its own
    cases = [(m, p, b, gc) for m, p, b in CASES for gc in (False, True)[:1 + args.grad_checkpoint]
             if m in args.models and p in args.precisions and (b < 4 or args.image_size == 32)]
    for model, precision, batch, gc in cases:
        name = f"{model} {precision} {batch}" + " gc" * gc
        if name in results.get("cases", {}):
            continue
        with spawn.Pool(1) as pool:
            rec = pool.apply(measure, (model, precision, batch, args.image_size, gc))
        results.setdefault("cases", {})[name] = rec
        print(name, {k: v if k in ("loss", "seconds", "params") else round(v / GIB, 3) for k, v in rec.items()},
              flush=True)
        with plumbing.atomic_write(path, "w") as f:  # after each case: a rerun goes on from here
            json.dump(results, f, indent=1)
    md = table(results["cases"], 32 if args.image_size == 32 else 16)  # the paper's images a GPU: 256 px, 512 px
    with plumbing.atomic_write(os.path.join(args.out, "memory.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
