"""
The README's 8-rank commands on the CPU (gloo), against 1 rank: prepare_latents.py on the toy set, train.py with
the same global batch on 1 rank, on 8 ranks (stopped at the half and resumed) and on 2 ranks x --grad-accum 4
(resuming the 8 ranks' half-way checkpoint), then sample.py on 8 ranks and on 1.

    python -m experiments.ranks --out assets/ranks      # ~5 min on 2 cores; the runs go to runs/ranks

Writes OUT/ranks.json and OUT/ranks.md: whether the datasets' and the samples' bytes are equal, and how far the
runs' weights, EMA, AdamW moments, losses and val losses are from the 1-rank run's (max |a - b| / max |a| per
tensor, the largest over the tensors).
"""

import hashlib
import json
import os
import subprocess
import sys

import torch

import plumbing

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--model", "DDT-Toy/4", "--global-batch-size", "64", "--lr", "2e-3", "--log-every", "1", "--ckpt-every",
         "10", "--keep-every", "10", "--sample-every", "0", "--num-workers", "0", "--val-every", "10"]
STEPS = 20


def run(world, *args):
    """One of the scripts, on `world` CPU ranks through torchrun (1: plain python), one thread a rank."""
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                             if world > 1 else []), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")


def digest(folder):
    """sha1 of each file in `folder` (its sub-folders left out)."""
    return {f: hashlib.sha1(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, f))}


def max_rel_diff(a, b):
    """The largest |a - b| / max|a| over the tensors of two state dicts (or optimizer states) with the same keys."""
    if isinstance(a, dict):
        return max(max_rel_diff(a[k], b[k]) for k in a)
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-12)).item()


def log_of(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def compare(ref_dir, run_dir):
    """How far a run's final checkpoint and log are from the reference run's."""
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (ref_dir, run_dir))
    out = {k: max_rel_diff(a[k], b[k]) for k in ("model", "ema")}
    out["adamw"] = max_rel_diff(a["optimizer"]["state"], b["optimizer"]["state"])
    key = lambda r: (r["step"], "val_loss" in r)  # a step's training line and its val line
    ref, rows = {key(r): r for r in log_of(ref_dir)}, log_of(run_dir)
    for field in ("loss", "val_loss", "val_loss_ema"):
        out[field] = max(abs(r[field] - ref[key(r)][field]) / abs(ref[key(r)][field]) for r in rows if field in r)
    return out


def main(argv=None):
    p = plumbing.ArgumentParser("The README's commands on 8 CPU ranks against 1 rank.")
    p.add_argument("--out", required=True, help="folder for ranks.json and ranks.md")
    p.add_argument("--work", default="runs/ranks", help="folder for the data sets and the runs (a rerun reuses them)")
    args = p.parse_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    d = {name: os.path.join(work, name) for name in ("toy", "toy8", "val", "one", "eight", "two")}
    for world, name, extra in ((1, "toy", []), (8, "toy8", []), (1, "val", ["--split", "val"])):
        if not os.path.exists(os.path.join(d[name], "meta.json")):
            run(world, "prepare_latents.py", "--toy", *extra, "--out", d[name])
    same_data = digest(d["toy"]) == digest(d["toy8"])
    train = ["train.py", "--data", d["toy"], "--val-data", d["val"], *TRAIN]
    if not os.path.exists(os.path.join(d["one"], "ckpt_%07d.pt" % STEPS)):
        run(1, *train, "--out-dir", d["one"], "--max-steps", STEPS)
        run(8, *train, "--out-dir", d["eight"], "--max-steps", STEPS // 2)  # then rerun: resumes
        run(8, *train, "--out-dir", d["eight"], "--max-steps", STEPS)
        os.makedirs(d["two"], exist_ok=True)
        plumbing.save_atomic(torch.load(os.path.join(d["eight"], "ckpt_%07d.pt" % (STEPS // 2)), weights_only=True),
                             os.path.join(d["two"], "ckpt.pt"))
        run(2, *train, "--out-dir", d["two"], "--max-steps", STEPS, "--grad-accum", 4)
    samples = {}
    for world in (1, 8):
        npz = os.path.join(work, f"samples{world}.npz")
        run(world, "sample.py", "--ckpt", os.path.join(d["eight"], "ckpt.pt"), "--num-samples", 64, "--num-steps",
            20, "--cfg-scale", 3.0, "--batch-size", 4, "--npz", npz)
        samples[world] = hashlib.sha1(open(npz, "rb").read()).hexdigest()
        os.remove(npz)
    out = {"steps": STEPS, "train_flags": TRAIN, "dataset_bytes_equal": same_data, "dataset_sha1": digest(d["toy"]),
           "samples_bytes_equal": samples[1] == samples[8], "samples_sha1": samples,
           "8_ranks_resumed_vs_1": compare(d["one"], d["eight"]),
           "2_ranks_x_grad_accum_4_from_8_ranks_step_%d_vs_1" % (STEPS // 2): compare(d["one"], d["two"])}
    with plumbing.atomic_write(os.path.join(args.out, "ranks.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"prepare_latents.py --toy, 8 ranks against 1: dataset bytes equal: {same_data}",
             f"sample.py, 64 samples, 8 ranks against 1 (--batch-size 4): npz bytes equal: {samples[1] == samples[8]}",
             "", f"train.py, {STEPS} steps of global batch 64 ({' '.join(TRAIN)}), against 1 rank "
             "(max |a - b| / max |a| over the tensors; losses: the largest relative difference over the log)", "",
             "| run | weights | EMA | AdamW moments | loss | val_loss | val_loss_ema |", "|---|---|---|---|---|---|---|"]
    for name in (k for k in out if k.endswith("_vs_1")):
        r = out[name]
        lines.append(f"| {name[:-5].replace('_', ' ')} | " + " | ".join(f"{r[k]:.1e}" for k in
                     ("model", "ema", "adamw", "loss", "val_loss", "val_loss_ema")) + " |")
    with plumbing.atomic_write(os.path.join(args.out, "ranks.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
