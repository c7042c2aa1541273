"""
Does fine-tuning help at this size? A DDT pretrained on one built-in set, then trained on another with
train.py --init-from, against the same model trained there from scratch, 3 seeds each: the steps the fine-tuned
runs take to reach the from-scratch runs' final validation loss (their seed means, against run length), and the
sample quality of both (quality.py: Fréchet distance and class agreement of a digit classifier), with Welch's p.
A third arm continues the from-scratch runs to as many training FLOPs as the pretraining and the fine-tuning took
together (ddt.flops_per_image at both sizes; rounded up to --val-every), so the pretraining's cost is not left out.

    OMP_NUM_THREADS=1 python -m experiments.finetune --pretrain-data data/digits16 --pretrain-val data/digits16_val \\
        --data data/digits --val-data data/digits_val --out-dir runs/finetune

The default: DDT-Toy/4 (96 wide, 4 + 2 blocks, patch 4) pretrained 1,500 steps on the 16 px digits (16 tokens),
then 600 steps on the 32 px digits (64 tokens; the RoPE spreads either grid over the same extent), batch 64,
lr 2e-3, the val loss every 50 steps. Every run is train.main in its own folder (a finished one is not trained
again); writes OUT/finetune.json, OUT/finetune.md and OUT/finetune.png (with matplotlib).
"""

import json
import math
import os
import shutil
from dataclasses import replace

import numpy as np

import ddt
import plumbing
import prepare_latents
import train
from experiments import quality
from experiments.study import finite, read_curve, run_quality, spread, steps_to_reach, welch


def run(data, val, out, steps, seed, extra, args):
    """train.main for one run (resumed or skipped if done); its (step, EMA val loss) curve."""
    curve = read_curve(out)
    if not curve or curve[-1][0] != steps:
        print(f"=== {out}", flush=True)
        train.main(["--data", data, "--val-data", val, "--out-dir", out, "--model", args.model, "--global-batch-size",
                    str(args.batch_size), "--lr", str(args.lr), "--max-steps", str(steps), "--seed", str(seed),
                    "--val-every", str(args.val_every), "--log-every", str(args.val_every), "--ckpt-every",
                    str(steps), "--sample-every", "0", "--num-workers", "0", *extra])
    return read_curve(out)


def continue_run(src, dst):
    """dst, if new, as a copy of the finished run src (checkpoint and log): train.main then resumes it exactly."""
    if not os.path.exists(dst):
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train.lock", "quality.json"))


def pretrain_in_target_steps(args):
    """The pretraining's training FLOPs in steps on the target set (ddt.flops_per_image at both latent sizes)."""
    shapes = [prepare_latents.read_meta(d)["latent_shape"] for d in (args.pretrain_data, args.data)]
    cfg = replace(ddt.PRESETS[args.model], in_channels=shapes[1][0])
    pre, target = (ddt.flops_per_image(cfg, h, w) for _, h, w in shapes)
    return args.pretrain_steps * pre / target


def summary(arms, scorer_floor):
    """The markdown tables: final val loss, steps to the scratch runs' final loss, sample quality, Welch's p."""
    scratch, tuned = arms["from scratch"], arms["fine-tuned"]
    target = np.mean([c[-1][1] for c in scratch["curves"]])
    lines = ["| arm | final EMA val loss | steps to the from-scratch final loss (seed mean) | FD | agreement (%) |",
             "|---|---|---|---|---|"]
    for name, a in arms.items():
        steps, mean = [s for s, _ in a["curves"][0]], np.mean([[v for _, v in c] for c in a["curves"]], 0)
        a["steps_to_target"] = steps_to_reach(steps, mean, target)
        cells = [spread([c[-1][1] for c in a["curves"]], ".4f"), f"{a['steps_to_target']:.0f}",
                 spread([q["fd"] for q in a["quality"]], ".2f"), spread([q["agreement"] for q in a["quality"]], ".1f")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if scorer_floor:
        lines.append(f"| real training images | | | {scorer_floor['fd']:.2f} | {scorer_floor['agreement']:.1f} |")
    p = {}
    for name, a in arms.items():
        if a is tuned:
            continue
        q = {m: welch([x[m] for x in a["quality"]], [x[m] for x in tuned["quality"]]) for m in ("fd", "agreement")}
        q["final_val_loss"] = welch([c[-1][1] for c in a["curves"]], [c[-1][1] for c in tuned["curves"]])
        for s in sorted({s for s, _ in a["curves"][0]} & {100, 200, 300, 600}):
            q[f"val_loss_at_{s}"] = welch(*[[dict(c)[s] for c in b["curves"]] for b in (a, tuned)])
        p[name] = q
        lines += ["", f"Welch's p, fine-tuned against {name}: " + ", ".join(f"{k} {v:.2g}" for k, v in q.items())]
    return "\n".join(lines) + "\n", p


def figure(arms, path, title, offset):
    """The val-loss curves against steps on the target set (left) and against all training FLOPs, the fine-tuned
    runs shifted by their pretraining's `offset` target-set steps (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, shifted in zip(axes, (False, True)):
        for (name, a), color in zip(arms.items(), ("tab:gray", "tab:blue", "tab:orange")):
            dx = offset if shifted and name == "fine-tuned" else 0
            for c in a["curves"]:
                ax.plot([s + dx for s, _ in c], [v for _, v in c], color=color, alpha=0.35, lw=1)
            steps = [s + dx for s, _ in a["curves"][0]]
            ax.plot(steps, np.mean([[v for _, v in c] for c in a["curves"]], 0), color=color, lw=2, label=name)
        ax.set(yscale="log", xlabel="training FLOPs, in steps on the target set (pretraining included)" if shifted
               else "step on the target set")
    axes[0].set(ylabel="EMA val loss")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    with plumbing.atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    return True


def main(argv=None):
    p = plumbing.ArgumentParser("Fine-tuning against training from scratch, on the built-in sets.")
    p.add_argument("--pretrain-data", required=True)
    p.add_argument("--pretrain-val", required=True)
    p.add_argument("--data", required=True, help="the target set")
    p.add_argument("--val-data", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--model", default="DDT-Toy/4")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=600, help="steps of every run on the target set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=1000, help="samples per model for the quality columns")
    p.add_argument("--sample-steps", type=int, default=50, help="Adams-2 steps of those samples")
    args = p.parse_args(argv)
    pre = os.path.join(args.out_dir, "pretrain")
    run(args.pretrain_data, args.pretrain_val, pre, args.pretrain_steps, 0, [], args)
    offset = pretrain_in_target_steps(args)
    long = math.ceil((args.steps + offset) / args.val_every) * args.val_every  # the fine-tuned runs' FLOPs
    arms = {"from scratch": ("from_scratch", args.steps, []),
            "fine-tuned": ("fine-tuned", args.steps, ["--init-from", os.path.join(pre, "ckpt.pt")]),
            f"from scratch, {long} steps (equal FLOPs)": ("from_scratch_flops", long, [])}
    scorer = quality.Scorer(os.path.join(args.out_dir, "classifier.pt"), args.data, args.val_data)
    for name, (folder, steps, extra) in arms.items():
        dirs = [os.path.join(args.out_dir, f"{folder}_seed{s}") for s in args.seeds]
        if folder == "from_scratch_flops":  # the from-scratch runs, continued: their first steps are not redone
            for d, s in zip(dirs, args.seeds):
                continue_run(os.path.join(args.out_dir, f"from_scratch_seed{s}"), d)
        arms[name] = {"curves": [run(args.data, args.val_data, d, steps, s, extra, args)
                                 for d, s in zip(dirs, args.seeds)],
                      "quality": [run_quality(d, scorer, args.num_samples, args.sample_steps) for d in dirs]}
    title = (f"{args.model}: {args.pretrain_steps} steps on {args.pretrain_data}, then {args.steps} on {args.data}; "
             f"{len(args.seeds)} seeds")
    md, pvalues = summary(arms, scorer.floor)
    out = {"settings": vars(args), "arms": arms, "p": pvalues, "floor": scorer.floor,
           "pretrain_curve": read_curve(pre)}
    with plumbing.atomic_write(os.path.join(args.out_dir, "finetune.json"), "w") as f:
        json.dump(finite(out), f, indent=1)
    with plumbing.atomic_write(os.path.join(args.out_dir, "finetune.md"), "w") as f:
        f.write(f"{title}\n\n{md}")
    drawn = figure(arms, os.path.join(args.out_dir, "finetune.png"), title, offset)
    print(f"{title}\n\n{md}" + ("" if drawn else "NO FIGURE (matplotlib missing)"))


if __name__ == "__main__":
    main()
