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


def measure(model, precision, batch, image_size):
    """One case in this process: bench.step_memory of a TrainStep, and the parameters' count."""
    torch.manual_seed(0)
    net = ddt.DDT(ddt.PRESETS[model])
    device = torch.device("cpu")
    step = bench.TrainStep(net, batch, (4, image_size, image_size), device, precision,
                           teacher=bench.random_teacher(device))
    return bench.step_memory(step) | {"params": sum(p.numel() for p in net.parameters())}


def fit(results, model, precision):
    """(state bytes, fixed activation bytes, activation bytes per image) from micro-batches 1 and 2."""
    one, two = (results[f"{model} {precision} {b}"] for b in (1, 2))
    state = sum(one[k] for k in ("weights", "gradients", "adamw", "ema", "teacher"))
    per_image = two["activations"] - one["activations"]
    return state, one["activations"] - per_image, per_image


def table(results):
    """The markdown summary of memory.json."""
    lines = ["| model | precision | parameters | state (weights, gradients, AdamW, EMA, teacher) | activations: fixed "
             "+ per image | predicted at 32 images | " + " | ".join(f"largest micro-batch, {g}" for g in GPUS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(GPUS)]
    for model in MODELS:
        for precision in ("bf16", "fp32"):
            state, fixed, per_image = fit(results, model, precision)
            params = results[f"{model} {precision} 1"]["params"]
            fits = [int((cap * GIB - state - fixed) // per_image) for cap in GPUS.values()]
            lines.append(f"| {model} | {precision} | {params / 1e6:.1f}M | {state / GIB:.2f} GiB | "
                         f"{fixed / GIB:.2f} + {per_image / GIB:.3f} GiB | "
                         f"{(state + fixed + 32 * per_image) / GIB:.1f} GiB | " + " | ".join(map(str, fits)) + " |")
    lines += ["", "Each case as measured (one step after a warm-up, CPU, GiB): predicted = state + activations; "
              "the peak is the whole process's resident memory in that step.", "",
              "| case | loss | seconds | activations saved | predicted | peak resident |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        model, precision, batch = name.split()
        state, fixed, per_image = fit(results, model, precision)
        predicted = state + fixed + int(batch) * per_image
        lines.append(f"| {name} | {r['loss']:.4f} | {r['seconds']:.1f} | {r['activations'] / GIB:.3f} | "
                     f"{predicted / GIB:.2f} | {r['peak'] / GIB:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = plumbing.ArgumentParser("Memory of DDT-XL/2 and iDiT-XL/2 training steps (CPU), and the "
                                "micro-batches that fit one GPU.")
    p.add_argument("--out", required=True, help="folder for memory.json and memory.md")
    p.add_argument("--image-size", type=int, default=32, help="latent height = width (32: 256 px images)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "memory.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    if results.get("image_size", args.image_size) != args.image_size:
        raise SystemExit(f"{path} holds cases at --image-size {results['image_size']}: use another --out")
    results["image_size"] = args.image_size
    spawn = multiprocessing.get_context("spawn")  # a fresh process a case: its peak is its own
    for model, precision, batch in CASES:
        name = f"{model} {precision} {batch}"
        if name in results.get("cases", {}):
            continue
        with spawn.Pool(1) as pool:
            rec = pool.apply(measure, (model, precision, batch, args.image_size))
        results.setdefault("cases", {})[name] = rec
        print(name, {k: v if k in ("loss", "seconds", "params") else round(v / GIB, 3) for k, v in rec.items()},
              flush=True)
        with plumbing.atomic_write(path, "w") as f:  # after each case: a rerun goes on from here
            json.dump(results, f, indent=1)
    with plumbing.atomic_write(os.path.join(args.out, "memory.md"), "w") as f:
        f.write(table(results["cases"]))
    print(table(results["cases"]))


if __name__ == "__main__":
    main()
