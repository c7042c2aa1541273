"""
The paper in miniature: train the improved DiT and several encoder/decoder splits on the same data with the same
steps, batch, learning rate and seeds, and compare them by their held-out validation loss (train.py's EMA
`val_loss_ema`) over the whole run and by the quality of their samples (quality.py). Each run is train.py's own
loop (`train.main`) in its own folder; a finished run is never trained again, and an interrupted one resumes from
its checkpoint, so rerunning the same command after a stop continues the study.

    OMP_NUM_THREADS=1 python -m experiments.study --data data/digits16 --val-data data/digits16_val \\
        --out-dir runs/study_w64 --hidden-size 64 --num-heads 4 --steps 1500 --classifier runs/classifier_digits16.pt

Defaults: 8 blocks (as the improved DiT, `--encoder-depths 8`, i.e. no decoder, and split 2En6De, 4En4De, 6En2De,
7En1De), 4 heads, patch 2, 3 seeds, 2,000 steps of batch 64 at lr 2e-3, the val loss every 25 steps. Writes
OUT/study.json (every curve and score), OUT/study.md (the tables) and OUT/study.png (needs matplotlib, the one
optional import of the project; without it the summary says NO FIGURE).

What it reports, per configuration (mean ± sd over the seeds):
- the final val loss, and how much it still fell over the last 20% of the run (how far from flat it ended);
- the speed-up as a curve: for each step T, the step at which the split's seed-mean val loss reaches the improved
  DiT's at T (linear between evaluations), and T over that; and the losses at matched steps;
- sample quality: class agreement and the Fréchet distance to the held-out images in the features of a classifier
  trained on the training split, from --num-samples samples of each model (Adams-2, --sample-steps, no guidance);
- Welch's t-test between neighbouring configurations and between each split and the improved DiT.
"""

import json
import math
import os
from dataclasses import asdict

import numpy as np

import ddt
import plumbing
import prepare_latents
import pretrained
import sample
import train
from experiments import quality


def config_name(cfg):
    return "iDiT" if cfg.decoder_depth == 0 else f"{cfg.encoder_depth}En{cfg.decoder_depth}De"


def check_width(cfg):
    """SystemExit unless the width is at least the numbers of a patch, C p^2: the final layer maps the width D to
    C p^2, so a narrower model predicts every patch's velocity in a D-dimensional subspace, a floor under every
    configuration's loss, which the DDT's two patch embeddings can soften and the improved DiT's one cannot."""
    numbers = cfg.in_channels * cfg.patch_size ** 2
    if cfg.hidden_size < numbers:
        raise SystemExit(f"--hidden-size {cfg.hidden_size} is below the {numbers} numbers of a patch (C "
                         f"{cfg.in_channels} x patch {cfg.patch_size}^2): the final layer maps the width to a patch, "
                         f"so every predicted patch would lie in a {cfg.hidden_size}-dimensional subspace, a floor "
                         f"under the val loss of every configuration that can favour one over another. Use a width "
                         f"of at least {numbers} (twice that to be clear of it), or a smaller --patch-size.")


def read_curve(run_dir):
    """[(step, val_loss_ema)] of a run's log.jsonl."""
    curve, path = [], os.path.join(run_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill (train.py drops it on resume)
                    continue
                if "val_loss_ema" in rec:
                    curve.append((rec["step"], rec["val_loss_ema"]))
    return curve


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


def speedup_curve(steps, base, values):
    """[(T, S, T / S)] for each evaluation step T: S is the step at which `values` reaches `base`'s value at T (both
    curves on `steps`); the paper's "converges k times faster", read at every run length instead of one. Where the
    curve never reaches that loss, S is inf and the ratio nan (not 0: no speed-up can be read there)."""
    out = []
    for T, target in zip(steps, base):
        S = steps_to_reach(steps, values, target)
        out.append((T, S, math.nan if math.isinf(S) else T / S if S else math.inf))
    return out


def tail_change(steps, values, share=0.2):
    """How much the curve still fell over the last `share` of the run: (v(T - share T) - v(T)) / v(T), the value at
    T - share T linear between evaluations. Under 0.01: flat to the issue's 1%."""
    T = steps[-1]
    return (float(np.interp(T * (1 - share), steps, values)) - values[-1]) / values[-1]


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b) (its continued fraction, by Lentz's method)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below this point: use the symmetry
        return 1 - betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    f, c, d = 1.0, 1.0, 0.0
    for i in range(300):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1 + num / (c if abs(c) > 1e-300 else 1e-300)
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1) / a


def welch(a, b):
    """Welch's unequal-variance t-test of two samples: the two-sided p-value (Student's t with Welch-Satterthwaite
    degrees of freedom). nan if either sample has fewer than 2 values or both have no spread."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return math.nan
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return betainc(df / 2, 0.5, df / (df + t * t))


def run_quality(run_dir, scorer, num_samples, num_steps, seed=0):
    """The sample quality of a run's final EMA model (Scorer.score of `num_samples` Adams-2 samples of
    `num_steps` steps, no guidance), kept in RUN/quality.json so that a rerun does not sample again."""
    path, ckpt = os.path.join(run_dir, "quality.json"), os.path.join(run_dir, "ckpt.pt")
    model = pretrained.load_ddt(ckpt).eval()
    key = json.dumps(dict(num_samples=num_samples, num_steps=num_steps, seed=seed, bytes=os.path.getsize(ckpt)))
    cache = {}
    if os.path.isfile(path):
        with open(path) as f:
            cache = json.load(f)
    if key not in cache:
        meta = plumbing.load_checkpoint(ckpt)["data"]
        x, y = quality.draw(model, tuple(meta["latent_shape"]), num_samples, sample.Sampler(num_steps, order=2),
                            seed=seed)
        cache[key] = scorer.score(x, y)
        with plumbing.atomic_write(path, "w") as f:
            json.dump(cache, f)
    return cache[key]


def finite(obj):
    """obj with every infinite or nan float (a curve that never reached the target) as None: strict JSON."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def mean_sd(values):
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def spread(values, fmt=".4f"):
    """'mean ± sd' over the seeds or models (sample standard deviation), or the value alone for one."""
    m, sd = mean_sd(values)
    return f"{m:{fmt}} ± {sd:{fmt}}" if len(values) > 1 else f"{m:{fmt}}"


def summarize(results):
    """Per configuration: the seed-mean curve, the final val loss and the quality scores (mean, sd, per seed), how
    far from flat the curve ended, the speed-up curve against the improved DiT (the first configuration if none is
    one), its final point (steps_to_base, speedup); and the p-values of `significance`. Returns the base."""
    for r in results:
        curves = np.array([[v for _, v in c] for c in r["curves"].values()])  # (seeds, evaluations)
        r["steps"] = [s for s, _ in next(iter(r["curves"].values()))]
        r["mean_curve"] = curves.mean(0).tolist()
        r["final"] = curves[:, -1].tolist()
        r["final_mean"], r["final_std"] = mean_sd(r["final"])
        r["tail_change"] = tail_change(r["steps"], r["mean_curve"])
        for metric in ("fd", "agreement"):
            if r.get("quality"):
                r[metric] = [q[metric] for q in r["quality"].values()]
                r[f"{metric}_mean"], r[f"{metric}_std"] = mean_sd(r[metric])
    base = next((r for r in results if r["decoder_depth"] == 0), results[0])
    for r in results:
        r["speedup_curve"] = speedup_curve(r["steps"], base["mean_curve"], r["mean_curve"])
        _, r["steps_to_base"], r["speedup"] = r["speedup_curve"][-1]
    return base


def significance(results, base):
    """[(a, b, {metric: Welch's p})] for each pair of neighbouring configurations and each split against `base`."""
    pairs = list(zip(results, results[1:])) + [(base, r) for r in results if r is not base]
    seen, out = set(), []
    for a, b in pairs:
        if (a["name"], b["name"]) in seen:
            continue
        seen.add((a["name"], b["name"]))
        out.append((a["name"], b["name"], {m: welch(a[m], b[m]) for m in ("final", "fd", "agreement") if m in a}))
    return out


def fmt_p(p):
    if math.isnan(p):
        return "-"
    return f"{p:.2g}" + ("" if p <= 0.05 else " (indistinguishable)")


def tables(results, base, floor=None):
    """study.md's tables: the main one, the losses and speed-ups at matched steps, and the significance."""
    q = "fd" in results[0]
    lines = [f"| configuration | parameters | training GFLOP / image | final val loss (EMA) | fell over the last 20% | "
             f"steps to {base['name']}'s final loss | speed-up at the end |"
             + (" Fréchet distance | class agreement (%) |" if q else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if q else "")]
    for r in results:
        reach = "not reached" if math.isinf(r["steps_to_base"]) else f"{r['steps_to_base']:,.0f}"
        speed = "-" if math.isinf(r["steps_to_base"]) else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {3 * r['gflops']:.4f} | {r['final_mean']:.4f} ± "
                     f"{r['final_std']:.4f} | {100 * r['tail_change']:.1f}% | {reach} | {speed} |"
                     + (f" {r['fd_mean']:.2f} ± {r['fd_std']:.2f} | {r['agreement_mean']:.1f} ± "
                        f"{r['agreement_std']:.1f} |" if q else ""))
    if q and floor:
        lines.append(f"| real training images | | | | | | | {floor['fd']:.2f} | {floor['agreement']:.1f} |")
    n = len(results[0]["curves"])
    lines.append(f"\n(mean ± sd over {n} seeds; training FLOPs = 3 x the forward's; speed-up = {base['name']}'s "
                 f"steps / the row's)\n")
    steps = base["steps"]
    marks = sorted({steps[min(len(steps) - 1, max(0, round(f * len(steps)) - 1))] for f in (0.1, 0.25, 0.5, 0.75, 1)})
    idx = [steps.index(s) for s in marks]
    lines += ["Seed-mean val loss at matched steps, and in brackets the speed-up at that run length T (T / the step at "
              f"which the row reaches {base['name']}'s loss at T):\n",
              "| configuration | " + " | ".join(f"step {s}" for s in marks) + " |", "|---|" + "---|" * len(marks)]
    for r in results:
        cells = []
        for i in idx:
            ratio = r["speedup_curve"][i][2]
            cells.append(f"{r['mean_curve'][i]:.4f}" + ("" if r is base else f" ({ratio:.2f}x)" if math.isfinite(
                ratio) else " (-)"))
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["\nWelch's t-test, two-sided p over the seeds (indistinguishable: p > 0.05):\n",
              "| pair | final val loss | " + ("Fréchet distance | class agreement |" if q else ""),
              "|---|---|" + ("---|---|" if q else "")]
    for a, b, ps in significance(results, base):
        lines.append(f"| {a} vs {b} | " + " | ".join(fmt_p(ps[m]) for m in ("final", "fd", "agreement") if m in ps)
                     + " |")
    return "\n".join(lines) + "\n"


def figure(results, base, path, title):
    """Three panels: the val-loss curves (seed mean, band min..max), the speed-up against run length, and the
    Fréchet distance of each configuration's samples. Prints NO FIGURE, loudly, without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nNO FIGURE: matplotlib is not installed, so {path} was not written (pip install matplotlib, then "
              f"rerun the same command: it trains nothing again)\n")
        return False
    q = "fd" in results[0]
    fig, axes = plt.subplots(1, 3 if q else 2, figsize=(15 if q else 10, 4.5), dpi=120)
    for r in results:
        curves = np.array([[v for _, v in c] for c in r["curves"].values()])
        idit = r["decoder_depth"] == 0
        line, = axes[0].plot(r["steps"], curves.mean(0), label=f"{r['name']} ({r['final_mean']:.4f})",
                             lw=2.2 if idit else 1.4, ls="--" if idit else "-")
        axes[0].fill_between(r["steps"], curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
        if r is not base:
            T, _, ratio = zip(*r["speedup_curve"])
            axes[1].plot(T, [x if math.isfinite(x) else np.nan for x in ratio], color=line.get_color(), lw=1.4,
                         label=r["name"])
        if q:
            axes[2].errorbar([r["name"]], [r["fd_mean"]], yerr=[[r["fd_mean"] - min(r["fd"])],
                             [max(r["fd"]) - r["fd_mean"]]], fmt="o", color=line.get_color(), capsize=4)
    lo = min(min(r["mean_curve"][len(r["steps"]) // 3:]) for r in results)  # the later part, where they separate
    hi = max(max(r["mean_curve"][len(r["steps"]) // 3:]) for r in results)
    axes[0].set(xlabel="training step", ylabel="val loss (EMA model)",
                ylim=(lo - 0.1 * (hi - lo), hi + 0.5 * (hi - lo)))
    axes[0].legend(title="mean of seeds, band = min..max", fontsize=8)
    axes[1].axhline(1, color="grey", lw=0.8)
    axes[1].set(xlabel="run length T (steps)", ylabel=f"speed-up over {base['name']} at T",
                title=f"T / steps to reach {base['name']}'s loss at T")
    axes[1].legend(fontsize=8)
    if q:
        axes[2].set(ylabel="Fréchet distance to held-out images", title="samples (mean, bars min..max over seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with plumbing.atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True


def get_args(argv=None):
    p = plumbing.ArgumentParser(__doc__.split("\n\n")[1].strip())
    p.add_argument("--data", required=True, help="training set from prepare_latents.py")
    p.add_argument("--val-data", required=True, help="held-out set from prepare_latents.py")
    p.add_argument("--out-dir", required=True, help="study folder: runs/, study.json, study.md, study.png")
    p.add_argument("--model", default="DDT-Toy/4", help="preset for the fields not set below (mlp ratio)")
    p.add_argument("--hidden-size", type=int, default=64, help="width; at least C x patch^2 (refused below)")
    p.add_argument("--num-heads", type=int, default=4, help="heads")
    p.add_argument("--patch-size", type=int, default=2, help="patch size")
    p.add_argument("--depth", type=int, default=8, help="blocks of every configuration")
    p.add_argument("--encoder-depths", type=int, nargs="+", default=[8, 2, 4, 6, 7],
                   help="one configuration each: E encoder and depth - E decoder blocks; E = depth is the improved DiT")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every configuration")
    p.add_argument("--steps", type=int, default=2000, help="training steps of every run")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of every run")
    p.add_argument("--val-every", type=int, default=25, help="steps between val-loss evaluations")
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between checkpoints of a run")
    p.add_argument("--val-size", type=int, help="train.py --val-size (default: every valid image of --val-data)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per model for the quality columns (0: none)")
    p.add_argument("--sample-steps", type=int, default=50, help="Adams-2 steps of those samples")
    p.add_argument("--classifier", help="the quality classifier's file (default OUT/classifier.pt; trained if missing)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    if any(not 1 <= e <= args.depth for e in args.encoder_depths):
        raise SystemExit(f"--encoder-depths must lie in 1..--depth ({args.depth}), got {args.encoder_depths}")
    meta = prepare_latents.read_meta(args.data, "--data")

    results, flags = [], {}
    for e in dict.fromkeys(args.encoder_depths):
        model = ["--model", args.model, "--encoder-depth", str(e), "--decoder-depth", str(args.depth - e),
                 "--hidden-size", str(args.hidden_size), "--num-heads", str(args.num_heads),
                 "--patch-size", str(args.patch_size)]
        cfg = train.model_config(train.get_args(["--data", args.data, "--out-dir", "-", *model]), meta)
        check_width(cfg)
        results.append(dict(name=config_name(cfg), **asdict(cfg), gflops=ddt.flops_per_image(
            cfg, *meta["latent_shape"][1:]) / 1e9, params=sum(p.numel() for p in ddt.DDT(cfg).parameters())))
        flags[results[-1]["name"]] = model
    run_dir = {(r["name"], seed): os.path.join(args.out_dir, "runs", f"{r['name']}_seed{seed}")
               for r in results for seed in args.seeds}
    for seed in args.seeds:  # seeds outside: a study cut short has every configuration at its first seeds
        for r in results:
            run = run_dir[r["name"], seed]
            curve = read_curve(run)
            if not curve or curve[-1][0] != args.steps:  # not finished: train (or resume) it
                print(f"=== {r['name']}, seed {seed}: {run}", flush=True)
                train.main(["--data", args.data, "--val-data", args.val_data, "--out-dir", run, *flags[r["name"]],
                            "--global-batch-size", str(args.batch_size), "--lr", str(args.lr),
                            "--max-steps", str(args.steps), "--seed", str(seed), "--val-every", str(args.val_every),
                            "--log-every", str(args.val_every), "--ckpt-every", str(args.ckpt_every),
                            "--sample-every", "0", "--num-workers", "0",
                            *(["--val-size", str(args.val_size)] if args.val_size else [])])
    scorer = None
    if args.num_samples:
        scorer = quality.Scorer(args.classifier or os.path.join(args.out_dir, "classifier.pt"), args.data,
                                args.val_data)
    for r in results:
        r["curves"] = {str(seed): read_curve(run_dir[r["name"], seed]) for seed in args.seeds}
        if scorer:
            print(f"=== sample quality of {r['name']}", flush=True)
            r["quality"] = {str(seed): run_quality(run_dir[r["name"], seed], scorer, args.num_samples,
                                                   args.sample_steps) for seed in args.seeds}

    base = summarize(results)
    title = (f"{args.data}: {args.depth} blocks of width {args.hidden_size}, patch {args.patch_size}, {args.steps} "
             f"steps of batch {args.batch_size}, lr {args.lr}, {len(args.seeds)} seeds"
             + (f"; samples: {args.num_samples} per model, Adams-2 {args.sample_steps} steps, no guidance"
                if scorer else ""))
    md = f"{title}\n\n{tables(results, base, scorer.floor if scorer else None)}"
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "classifier")}
    out = {"settings": settings, "floor": scorer.floor if scorer else None,
           "significance": significance(results, base), "results": results}
    with plumbing.atomic_write(os.path.join(args.out_dir, "study.json"), "w") as f:
        json.dump(finite(out), f, indent=1)
    with plumbing.atomic_write(os.path.join(args.out_dir, "study.md"), "w") as f:
        f.write(md)
    drawn = figure(results, base, os.path.join(args.out_dir, "study.png"), title)
    print(md)
    print(f"wrote {args.out_dir}/study.json, study.md" + (", study.png" if drawn else " and NO FIGURE (see above)"))
    return results


if __name__ == "__main__":
    main()
