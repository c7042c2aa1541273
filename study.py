"""
The paper in miniature: train several configurations on the same data with the same steps, batch, learning rate
and seeds, and compare their held-out validation loss (train.py's EMA `val_loss_ema`). Each run is train.py's own
loop (`train.main`) in its own folder; a run that has finished is never trained again, and an interrupted one
resumes from its checkpoint, so rerunning the same command after a stop continues the study.

    python study.py --data data/digits --val-data data/digits_val --out-dir runs/study_digits

The default configurations are the paper's B-size sweep (Fig. 7) at a width a CPU can train: 12 blocks as the
improved DiT (`--encoder-depths 12`, i.e. no decoder) and split 4En8De, 6En6De, 8En4De, 10En2De. Writes
OUT/study.json (every curve), OUT/study.md (the table) and OUT/study.png (the curves; needs matplotlib, the only
optional import of the project). The table's "steps to the iDiT's loss" reads a curve the way the paper reads
its "4x faster": the first step at which the seed-mean val loss reaches the improved DiT's final seed-mean val
loss (linear between evaluations), and the speed-up is the improved DiT's steps over that.
"""

import argparse
import json
import math
import os
from dataclasses import asdict, replace

import numpy as np

import ddt
import train


def config_name(cfg):
    return "iDiT" if cfg.decoder_depth == 0 else f"{cfg.encoder_depth}En{cfg.decoder_depth}De"


def read_curve(run_dir):
    """[(step, val_loss_ema)] of a run's log.jsonl, and its median seconds per training step."""
    curve, sec = [], []
    path = os.path.join(run_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill (train.py drops it on resume)
                    continue
                if "val_loss_ema" in rec:
                    curve.append((rec["step"], rec["val_loss_ema"]))
                if "steps_per_s" in rec:
                    sec.append(1 / rec["steps_per_s"])
    return curve, (float(np.median(sec)) if sec else math.nan)


def steps_to_reach(steps, values, target):
    """The first step at which the curve (values at steps, in order) is at or below target, linear between two
    evaluations; math.inf if it never is."""
    for i, (s, v) in enumerate(zip(steps, values)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return math.inf


def summarize(results):
    """Per configuration: mean and std over seeds of the final val loss, the seed-mean curve, and the steps to the
    improved DiT's final seed-mean loss with the speed-up over it (the first configuration, if none is an iDiT)."""
    for r in results:
        curves = np.array([[v for _, v in c] for c in r["curves"].values()])  # (seeds, evaluations)
        r["steps"] = [s for s, _ in next(iter(r["curves"].values()))]
        r["mean_curve"] = curves.mean(0).tolist()
        r["final_mean"] = float(curves[:, -1].mean())
        r["final_std"] = float(curves[:, -1].std(ddof=1)) if len(curves) > 1 else 0.0  # (sample std)
    base = next((r for r in results if r["decoder_depth"] == 0), results[0])
    for r in results:
        r["steps_to_base"] = steps_to_reach(r["steps"], r["mean_curve"], base["final_mean"])
        r["speedup"] = base["steps_to_base"] / r["steps_to_base"]
    return base


def table(results, base):
    lines = [f"| configuration | parameters | forward GFLOP / image | CPU s / step | final val loss (EMA) | "
             f"steps to {base['name']}'s final loss | speed-up |", "|---|---|---|---|---|---|---|"]
    for r in results:
        reach = "not reached" if math.isinf(r["steps_to_base"]) else f"{r['steps_to_base']:,.0f}"
        speed = "-" if math.isinf(r["steps_to_base"]) else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['gflops']:.4f} | {r['sec_per_step']:.3f} | "
                     f"{r['final_mean']:.4f} ± {r['final_std']:.4f} | {reach} | {speed} |")
    n = len(next(iter(results))["curves"])
    return "\n".join(lines) + f"\n\n(mean ± std over {n} seeds; speed-up = {base['name']}'s steps / the row's)\n"


def figure(results, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no figure: matplotlib is not installed (pip install matplotlib); {path} not written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in results:
        curves = np.array([[v for _, v in c] for c in r["curves"].values()])
        line, = ax.plot(r["steps"], curves.mean(0), label=f"{r['name']} ({r['final_mean']:.4f})",
                        lw=2.2 if r["decoder_depth"] == 0 else 1.4, ls="--" if r["decoder_depth"] == 0 else "-")
        ax.fill_between(r["steps"], curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
    ax.set(xlabel="training step", ylabel="val loss (EMA model)", title=title)
    lo = min(min(r["mean_curve"][len(r["steps"]) // 4:]) for r in results)
    hi = max(max(r["mean_curve"][len(r["steps"]) // 4:]) for r in results)
    ax.set_ylim(lo - 0.15 * (hi - lo), hi + 0.6 * (hi - lo))  # the later part, where the curves separate
    ax.grid(alpha=0.3)
    ax.legend(title="mean of seeds, band = min..max", fontsize=8)
    fig.tight_layout()
    with ddt.atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                formatter_class=ddt.HelpFormatter)
    p.add_argument("--data", required=True, help="training set from prepare_latents.py")
    p.add_argument("--val-data", required=True, help="held-out set from prepare_latents.py")
    p.add_argument("--out-dir", required=True, help="study folder: runs/, study.json, study.md, study.png")
    p.add_argument("--model", default="DDT-Toy/4", help="preset giving the width, heads and patch size")
    p.add_argument("--hidden-size", type=int, default=32, help="width (overrides the preset)")
    p.add_argument("--num-heads", type=int, default=2, help="heads (overrides the preset)")
    p.add_argument("--depth", type=int, default=12, help="blocks of every configuration")
    p.add_argument("--encoder-depths", type=int, nargs="+", default=[12, 4, 6, 8, 10],
                   help="one configuration each: E encoder and depth - E decoder blocks; E = depth is the "
                        "improved DiT")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every configuration")
    p.add_argument("--steps", type=int, default=600, help="training steps of every run")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of every run")
    p.add_argument("--val-every", type=int, default=50, help="steps between val-loss evaluations")
    p.add_argument("--val-size", type=int, help="train.py --val-size (default: every valid image of --val-data)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader processes of each run")
    args = p.parse_args(argv)
    if any(not 1 <= e <= args.depth for e in args.encoder_depths):
        raise SystemExit(f"--encoder-depths must lie in 1..--depth ({args.depth}), got {args.encoder_depths}")
    meta = train.read_meta(args.data, "--data")

    results, flags = [], {}
    for e in dict.fromkeys(args.encoder_depths):
        model = ["--model", args.model, "--encoder-depth", str(e), "--decoder-depth", str(args.depth - e)]
        for flag in ("hidden_size", "num_heads"):
            if getattr(args, flag) is not None:
                model += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cfg = train.model_config(train.get_args(["--data", args.data, "--out-dir", "-", *model]), meta)
        results.append(dict(name=config_name(cfg), **asdict(cfg), gflops=train.flops_per_image(
            cfg, *meta["latent_shape"][1:]) / 1e9, params=sum(p.numel() for p in ddt.DDT(cfg).parameters())))
        flags[results[-1]["name"]] = model
    for seed in args.seeds:  # seeds outside: a study cut short has every configuration at its first seeds
        for r in results:
            run = os.path.join(args.out_dir, "runs", f"{r['name']}_seed{seed}")
            curve, _ = read_curve(run)
            if not curve or curve[-1][0] != args.steps:  # not finished: train (or resume) it
                print(f"=== {r['name']}, seed {seed}: {run}", flush=True)
                train.main(["--data", args.data, "--val-data", args.val_data, "--out-dir", run, *flags[r["name"]],
                            "--global-batch-size", str(args.batch_size), "--lr", str(args.lr),
                            "--max-steps", str(args.steps), "--seed", str(seed), "--val-every", str(args.val_every),
                            "--log-every", str(args.val_every), "--ckpt-every", str(args.val_every),
                            "--sample-every", "0", "--num-workers", str(args.num_workers),
                            *(["--val-size", str(args.val_size)] if args.val_size else [])])
    for r in results:
        runs = {seed: read_curve(os.path.join(args.out_dir, "runs", f"{r['name']}_seed{seed}")) for seed in args.seeds}
        r["curves"] = {str(seed): curve for seed, (curve, _) in runs.items()}
        r["sec_per_step"] = float(np.median([sec for _, sec in runs.values()]))

    base = summarize(results)
    title = (f"{args.data}: {args.depth} blocks, width {results[0]['hidden_size']}, {args.steps} steps, batch "
             f"{args.batch_size}, {len(args.seeds)} seeds")
    md = f"{title}\n\n{table(results, base)}"
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    with ddt.atomic_write(os.path.join(args.out_dir, "study.json"), "w") as f:
        json.dump({"settings": settings, "results": [{k: None if v == math.inf else v for k, v in r.items()}
                                                     for r in results]}, f, indent=1)  # (not reached: null)
    with ddt.atomic_write(os.path.join(args.out_dir, "study.md"), "w") as f:
        f.write(md)
    figure(results, os.path.join(args.out_dir, "study.png"), title)
    print(md)
    return results


if __name__ == "__main__":
    main()
