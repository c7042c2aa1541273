"""
The samplers measured on trained models (research tools; nothing in the core imports this file):

    python -m experiments.samplers --frontier --ckpt runs/toy_s0/ckpt.pt runs/toy_s1/ckpt.pt runs/toy_s2/ckpt.pt \
        --num-steps 10 20 50 100 250 --batch-size 32 --cfg-scale 3.0      # deviation against steps, 3 models
    python -m experiments.samplers --sharing-table --ckpt ... --num-steps 100 --encoder-steps 10 25 50 \
        --batch-size 32 --cfg-scale 3.0                                     # the DP against uniform sharing
    python -m experiments.samplers --heatmap cost.png --ckpt runs/toy/ckpt.pt --num-steps 100 --encoder-steps 10 \
        --cfg-scale 3.0                                                     # what the sharing DP sees
    python -m experiments.samplers --sde-check data/digits --ckpt ... --num-steps 100 --cfg-scale 3.0
    python -m experiments.samplers --quality OUT --ckpt ... --train-data data/digits16 --val-data data/digits16_val \
        --num-steps 10 20 50 100                                            # sharing judged by sample quality

Every table is mean ± sd over the --ckpt models (models of one data set and config, e.g. training seeds 0, 1, 2).
The frontier measures each sampler by its samples' deviation from a many-step Euler sample on the same noise; the
quality frontier by class agreement and a Fréchet distance in a classifier's feature space (quality.py).
"""

import json
import math
import os
from collections import Counter
from dataclasses import asdict, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import ddt
import plumbing
import pretrained
import sample
from sample import Sampler
from bench import timed
from experiments import quality
from experiments.study import spread

def deviation(x, ref):
    """(relative RMS distance over the batch, the worst single image's): RMS(x - ref) / RMS(ref)."""
    err = (x - ref).pow(2).flatten(1).mean(1)  # (B,) per image
    return (err.mean() / ref.pow(2).mean()).sqrt().item(), (err / ref.pow(2).flatten(1).mean(1)).sqrt().max().item()


def timed_sample(model, device, autocast, noise, y, sampler, encoder_steps=None, generators=None):
    """(sample_loop's float32 result, seconds, a Counter of the images through the encoder and the decoder)."""
    count = Counter()
    x, secs = timed(device, autocast, lambda: sample.sample_loop(model, noise, y, sampler, encoder_steps, generators,
                                                                 sample.count_evals(count)))
    return x.float(), secs, count


def eval_batch(model, shape, batch, device):
    """The batch the tables sample: noise of seed 1000 (not the calibration batch's seed 0), labels spread."""
    noise = sample.image_noise(1000, range(batch), shape)[0].to(device)
    return noise, torch.tensor([i * model.cfg.num_classes // batch for i in range(batch)], device=device)


def sharing_table(models, shape, device, precision, num_steps, ks, batch, cfg_scale, repeats=3):
    """For each budget k, the paper's DP schedule (on the cosine cost) against the uniform one: how far samples
    with encoder sharing land from unshared ones on the same noise (relative RMS difference over the batch, and
    of the worst image), the schedule's cosine cost, the wall-clock speedup (the fastest of `repeats` runs)
    against the ideal (the ratio of block evaluations, E * encoder images + D * decoder images: with guidance on
    an interval steps differ in batch size, so this is not always (E + D) N / (E k + D N)), and the calibration
    time as a fraction of the unshared sampling of the batch; each as mean ± sd over `models` (models of the same
    data and config, trained with other seeds)."""
    N = num_steps
    autocast = plumbing.autocast(device, precision)
    rows = {}  # (k, name) -> per model (cosine cost, dev, worst, speedup, ideal, calibration, steps)
    for m, model in enumerate(models):
        E, D = model.cfg.encoder_depth, model.cfg.decoder_depth
        noise, y = eval_batch(model, shape, batch, device)

        def run(steps):  # (samples, fastest of `repeats` runs after a warm-up, block evaluations)
            timed_sample(model, device, autocast, noise[:2], y[:2], Sampler(3))
            runs = [timed_sample(model, device, autocast, noise, y, Sampler(N, cfg_scale=cfg_scale), steps)
                    for _ in range(repeats)]
            stats = runs[0][2]
            return runs[0][0], min(r[1] for r in runs), E * stats["encoder"] + D * stats["decoder"]

        ref, t_ref, work_ref = run(None)
        cos, t_cos = timed(device, autocast, lambda: sample.measure_sharing_cost(model, Sampler(N, cfg_scale=cfg_scale),
                                                                                 shape))
        found = {}
        for k in ks:
            t_ref = min(t_ref, run(None)[1])  # the unshared time too is the fastest of all its runs
            for name, steps, t_cal in (("dp", sample.solve_sharing(cos, k), t_cos),
                                       ("uniform", sample.uniform_schedule(N, k), 0.0)):
                x, t, work = run(steps)
                found[k, name] = (sample.sharing_cost(cos, steps), *deviation(x, ref), t, work_ref / work, t_cal, steps)
        for (k, name), (c_cos, dev, worst, t, ideal, t_cal, steps) in found.items():
            rows.setdefault((k, name), []).append((c_cos, dev, worst, t_ref / t, ideal, t_cal / t_ref, steps))
        print(f"model {m + 1}: unshared sampling of the batch: {t_ref:.2f}s; calibration (batch 8): {t_cos:.2f}s "
              f"({t_cos / t_ref:.2f}x)")
    print(f"| K of {N} | schedule | cosine cost | deviation (RMS) | worst image | speedup | ideal | of ideal | "
          f"calibration |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (k, name), per_model in rows.items():
        col = list(zip(*per_model))
        of_ideal = [s / i * 100 for s, i in zip(col[3], col[4])]
        print(f"| {k} | {name} | {spread(col[0])} | {spread(col[1])} | {spread(col[2])} | {spread(col[3], '.2f')}x | "
              f"{spread(col[4], '.2f')}x | {spread(of_ideal, '.0f')}% | {spread(col[5], '.2f')}x |")
    for (k, name), per_model in rows.items():
        if name == "dp":
            print(f"K = {k}, dp: " + "; ".join(str(r[6]) for r in per_model))


SOLVERS = {"Euler": 1, "Adams-2": 2, "Adams-3": 3}  # name -> order of sample_loop


def frontier(models, shape, device, precision, step_counts, batch, cfg_scale, reference_steps=1000,
             reference_last_step=0.04):
    """The steps-versus-error frontier: for each solver (Euler, Adams-2, Adams-3) and N in `step_counts`,
    unshared and with the encoder at K = N / 2 steps (the DP schedule on the paper's cosine cost, measured
    along that solver's trajectory), the deviation of its samples from a `reference_steps` Euler sample on the
    same noise (relative RMS over the batch), against the block evaluations per image (E * encoder images +
    D * decoder images, counted by the sampler) and the wall-clock time of one run; mean ± sd over `models`
    (blocks: the mean). The solvers use the released grid (a last step of 0.04 whatever N is); the reference
    ends with a step of `reference_last_step`: 0.04 keeps that step's Euler error in the reference, a small
    one brings it closer to the exact ODE solution.
    Then, per solver, the cheapest setting (in block evaluations) whose mean deviation is at most Euler's
    at the largest N."""
    autocast = plumbing.autocast(device, precision)
    rows = {}  # (solver, N, K) -> per model (deviation, blocks per image, seconds)
    for m, model in enumerate(models):
        E, D = model.cfg.encoder_depth, model.cfg.decoder_depth
        noise, y = eval_batch(model, shape, batch, device)
        timed_sample(model, device, autocast, noise[:2], y[:2], Sampler(3))  # warm-up
        ref, secs, _ = timed_sample(model, device, autocast, noise, y, Sampler(
            reference_steps, cfg_scale=cfg_scale, last_step=reference_last_step))
        print(f"model {m + 1}: the {reference_steps}-step Euler reference took {secs:.1f}s")
        for N in step_counts:
            for name, order in SOLVERS.items():
                for k in (N, N // 2):
                    steps = None
                    if k < N:
                        with autocast:
                            cost = sample.measure_sharing_cost(model, Sampler(N, order, cfg_scale=cfg_scale), shape)
                        steps = sample.solve_sharing(cost, k)
                    x, secs, stats = timed_sample(model, device, autocast, noise, y,
                                                  Sampler(N, order, cfg_scale=cfg_scale), steps)
                    blocks = (E * stats["encoder"] + D * stats["decoder"]) / batch
                    rows.setdefault((name, N, k), []).append((deviation(x, ref)[0], blocks, secs))
    print(f"reference: Euler, {reference_steps} steps, last step {reference_last_step}")
    print(f"| solver | N | K | blocks per image | deviation from Euler-{reference_steps} | time (s) |")
    print("|---|---|---|---|---|---|")
    for (name, N, k), per_model in rows.items():
        dev, blocks, secs = zip(*per_model)
        print(f"| {name} | {N} | {k if k < N else '-'} | {sum(blocks) / len(blocks):.0f} | {spread(dev)} | "
              f"{spread(secs, '.2f')} |")
    mean = {key: [sum(r[c] for r in v) / len(v) for c in range(2)] for key, v in rows.items()}  # deviation, blocks
    n_max = max(step_counts)
    target, base = mean["Euler", n_max, n_max]
    for name in SOLVERS:
        fits = [(mean[key][1], key) for key in rows if key[0] == name and mean[key][0] <= target]
        if fits:
            blocks, (_, N, k) = min(fits)
            print(f"{name}: the cheapest setting with a mean deviation at most Euler-{n_max}'s ({target:.4f}): N = {N}"
                  f"{f', K = {k}' if k < N else ''}, deviation {mean[name, N, k][0]:.4f}, {blocks:.0f} blocks per "
                  f"image ({base / blocks:.2f}x fewer than Euler-{n_max})")


def sde_check(models, shape, device, precision, num_steps, data_dir, per_class, cfg_scale):
    """A distribution-level check of the stochastic step rules (--sde) against the ODE: `per_class` samples of
    each class from each rule, each classified by its nearest image of the training set (1-NN, Euclidean, in
    the model's space: data_dir's latents.npy posterior means times the scaling factor); prints the share whose
    class is the one asked for, and the mean RMS distance to that nearest training image; mean ± sd over
    `models`. A first row gives the same for the training images themselves, each without itself (leave one
    out): how well the classifier does on real data, and how far apart real images are."""
    autocast = plumbing.autocast(device, precision)
    with open(os.path.join(data_dir, "meta.json")) as f:
        scale = json.load(f)["scaling_factor"]
    valid = np.load(os.path.join(data_dir, "valid.npy"))
    data = torch.from_numpy(np.load(os.path.join(data_dir, "latents.npy"), mmap_mode="r")[valid][:, 0]
                            .astype(np.float32)).flatten(1).to(device) * scale  # (n, C * h * w)
    labels = torch.from_numpy(np.load(os.path.join(data_dir, "labels.npy"))[valid]).to(device)

    def classify(x, y, skip=None):  # (% whose nearest training image has class y, mean RMS distance to it)
        found, dists = [], []
        for s in range(0, len(x), 1024):
            dist = torch.cdist(x[s: s + 1024], data)  # (rows, n)
            if skip is not None:  # leave one out: row r is training image skip[r]
                dist[torch.arange(len(dist)), skip[s: s + 1024]] = math.inf
            found.append(dist.min(1).indices)
            dists.append(dist.min(1).values)
        found, dists = torch.cat(found), torch.cat(dists)
        return (labels[found] == y).float().mean().item() * 100, (dists.pow(2) / x.shape[1]).sqrt().mean().item()

    rows = {"training images (leave one out)": [classify(data, labels, torch.arange(len(data), device=device))]}
    for model in models:
        y = torch.arange(model.cfg.num_classes, device=device).repeat_interleave(per_class)
        for rule in ("none", *sample.SDE_RULES):
            noise, gens = sample.image_noise(2000, range(len(y)), shape)
            x = timed_sample(model, device, autocast, noise.to(device), y,
                             Sampler(num_steps, 1, rule, cfg_scale=cfg_scale), None, gens)[0].flatten(1)
            rows.setdefault("ode" if rule == "none" else rule, []).append(classify(x, y))
    print(f"| step rule (N = {num_steps}) | class of the nearest training image = class asked (%) | "
          f"RMS distance to it |")
    print("|---|---|---|")
    for rule, per_model in rows.items():
        agree, dist = zip(*per_model)
        print(f"| {rule} | {spread(agree, '.1f')} | {spread(dist)} |")


def heatmap(path, cost, k, title):
    """A PNG of the (N, N) cost matrix (1 - cos(z_i, z_j), row i reuses column j; colour on a square-root scale)
    with the encoder steps of two schedules of k runs marked where they pay: the DP's below the diagonal (white,
    column a from row a to the end of its segment), the uniform schedule's above it (red, the same transposed),
    and ticks at both schedules' steps on the margins."""
    N = len(cost)
    cell, top, left, bottom = max(2, 480 // N), 34, 14, 30
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)  # viridis
    level = np.sqrt(np.clip(cost / cost.max(), 0, 1)) * (len(anchors) - 1)  # (N, N) in [0, 4]
    lo = np.minimum(level.astype(int), len(anchors) - 2)
    rgb = anchors[lo] + (level - lo)[..., None] * (anchors[lo + 1] - anchors[lo])
    img = Image.new("RGB", (left + N * cell + 8, top + N * cell + bottom), "white")
    img.paste(Image.fromarray(rgb.astype(np.uint8)).resize((N * cell, N * cell), Image.NEAREST), (left, top))
    draw = ImageDraw.Draw(img)
    dp, uni = sample.solve_sharing(cost, k), sample.uniform_schedule(N, k)
    for steps, colour, below in ((dp, (255, 255, 255), True), (uni, (230, 30, 30), False)):
        for a, b in zip(steps, steps[1:] + [N]):  # the segment [a, b) reuses z_a
            c0, c1 = left + a * cell + cell // 2, top + a * cell + cell // 2
            end = (b - 1) * cell + cell // 2
            draw.line([(c0, c1), (c0, top + end)] if below else [(c0, c1), (left + end, c1)], fill=colour,
                      width=max(1, cell // 2))
            if below:
                draw.line([(c0, top - 5), (c0, top - 1)], fill=(0, 0, 0))  # DP ticks above the matrix
            else:
                draw.line([(left - 5, c1), (left - 1, c1)], fill=(230, 30, 30))  # uniform ticks left of it
    font = ImageFont.load_default()
    draw.text((left, 2), title, fill="black", font=font)
    draw.text((left, 14), f"1 - cos(z_i, z_j), max {cost.max():.3f} (yellow, square-root scale); K = {k}: DP white, "
              f"uniform red", fill="black", font=font)
    draw.text((left, top + N * cell + 4), f"row i = step reusing z, column j = step z comes from; "
              f"DP cost {sample.sharing_cost(cost, dp):.3f}, uniform {sample.sharing_cost(cost, uni):.3f}",
              fill="black", font=font)
    with plumbing.atomic_write(path) as f:
        img.save(f, format="PNG")
    return dp, uni


RATIOS = (0.5, 0.35, 0.2)  # K / N of the quality frontier: 0.2 is the paper's sharing ratio 0.8
QUALITY_SOLVERS = {"Euler": 1, "Adams-2": 2}


def encoder_share(cfg, H, W):
    """The encoder's share of one step's forward FLOPs (ddt.flops_per_image without and with the encoder)."""
    return 1 - ddt.flops_per_image(replace(cfg, encoder_depth=0), H, W) / ddt.flops_per_image(cfg, H, W)


def quality_settings(N):
    """(schedule, K) of the quality frontier at N steps: unshared, then the DP and uniform at K = round(r N)."""
    ks = list(dict.fromkeys(max(1, round(r * N)) for r in RATIOS))
    return [("unshared", N)] + [(name, k) for k in ks for name in ("dp", "uniform")]


def quality_frontier(paths, models, shape, device, precision, step_counts, num_samples, cfg_scale, scorer, out_path,
                     repeats=0, time_batch=64):
    """Sharing judged by sample quality: for each solver of QUALITY_SOLVERS, N in `step_counts` and schedule of
    quality_settings(N) (the DP on the cosine cost, measured along that solver's trajectory, and the uniform
    schedule), `num_samples` samples of each model (the same noise for every setting, classes balanced) scored by
    `scorer` (quality.Scorer: class agreement, Fréchet distance to the held-out images), and their block
    evaluations per image. Each entry goes to `out_path` (JSON) as it is made, and a rerun skips those there, so
    the run resumes. With `repeats`, the seconds of a batch of `time_batch` images, the fastest of `repeats` runs,
    on the first model (time it with nothing else running). Returns the JSON's dict."""
    autocast = plumbing.autocast(device, precision)
    res = {"entries": {}, "times": {}, "time_batch": time_batch}
    if os.path.exists(out_path):
        with open(out_path) as f:
            res = json.load(f)
    if res["times"] and res["time_batch"] != time_batch:
        raise SystemExit(f"{out_path} has times of batches of {res['time_batch']} images, not {time_batch}")
    settings = {"num_samples": num_samples, "cfg_scale": cfg_scale, "precision": precision}
    if res.setdefault("settings", settings) != settings:
        raise SystemExit(f"{out_path} holds samples drawn with {res['settings']}, not {settings}: use another OUT")

    def save():
        with plumbing.atomic_write(out_path, "w") as f:
            json.dump(res, f, indent=1)

    for N in step_counts:  # N outside: a run cut short has every model at the first N
        for path, model in zip(paths, models):
            E, D = model.cfg.encoder_depth, model.cfg.decoder_depth
            for solver, order in QUALITY_SOLVERS.items():
                cost = None
                for name, k in quality_settings(N):
                    key = f"{path}|{solver}|{N}|{name}|{k}"
                    timing = repeats and path == paths[0] and key.split("|", 1)[1] not in res["times"]
                    if key in res["entries"] and not timing:
                        continue
                    steps = None
                    if key in res["entries"]:  # only timed: its schedule is stored
                        steps = res["entries"][key]["steps"]
                    elif name == "dp":
                        if cost is None:
                            with autocast:
                                cost = sample.measure_sharing_cost(model, Sampler(N, order, cfg_scale=cfg_scale),
                                                                   shape)
                        steps = sample.solve_sharing(cost, k)
                    elif name == "uniform":
                        steps = sample.uniform_schedule(N, k)
                    twin = key not in res["entries"] and next(  # the same schedule already drawn: the same samples
                        (e for kk, e in res["entries"].items() if kk.startswith(f"{path}|{solver}|{N}|")
                         and e["steps"] == steps), None)
                    if twin:
                        res["entries"][key] = dict(twin)
                    elif key not in res["entries"]:
                        stats = Counter()
                        with autocast:
                            x, y = quality.draw(model, shape, num_samples, Sampler(N, order, cfg_scale=cfg_scale),
                                                steps, watch=sample.count_evals(stats))
                        res["entries"][key] = scorer.score(x, y) | {
                            "blocks": (E * stats["encoder"] + D * stats["decoder"]) / num_samples,
                            "steps": steps}
                        print(f"{key}: {res['entries'][key]['fd']:.2f} FD, {res['entries'][key]['agreement']:.1f}%",
                              flush=True)
                    if timing:
                        noise, y = eval_batch(model, shape, time_batch, device)
                        res["times"][key.split("|", 1)[1]] = min(timed_sample(
                            model, device, autocast, noise, y, Sampler(N, order, cfg_scale=cfg_scale), steps)[1]
                            for _ in range(repeats))
                    save()
    return res


def quality_table(res, paths, step_counts, floor):
    """The quality frontier as markdown: one row per (solver, N, schedule, K), mean ± sd over the models; for the
    DP, on how many models its schedule is the uniform one (then the two rows are the same samples)."""
    lines = ["| solver | N | schedule | K | K / N | blocks per image | Fréchet distance | class agreement (%) | "
             "DP = uniform | time per image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for solver in QUALITY_SOLVERS:
        for N in step_counts:
            for name, k in quality_settings(N):
                per = [res["entries"][f"{p}|{solver}|{N}|{name}|{k}"] for p in paths]
                same = ""
                if name == "dp":
                    uni = sample.uniform_schedule(N, k)
                    same = f"{sum(e['steps'] == uni for e in per)} of {len(per)}"
                secs = res["times"].get(f"{solver}|{N}|{name}|{k}")
                ms = "-" if secs is None else f"{secs / res['time_batch'] * 1e3:.1f} ms"
                lines.append(f"| {solver} | {N} | {name} | {k} | {k / N:.2f} | "
                             f"{sum(e['blocks'] for e in per) / len(per):.0f} | "
                             f"{spread([e['fd'] for e in per], '.2f')} | "
                             f"{spread([e['agreement'] for e in per], '.1f')} | {same} | {ms} |")
    lines.append(f"| real images (floor) | | | | | | {floor['fd']:.2f} | {floor['agreement']:.1f} | | |")
    return "\n".join(lines) + "\n"


def quality_figure(res, paths, step_counts, floor, path, title):
    """FD and class agreement against block evaluations per image: a column per solver, a line per schedule and
    K / N across N (mean over the models, bars: min..max); the real images' floor dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"NO FIGURE: matplotlib is not installed (pip install matplotlib); {path} not written")
        return
    fig, axes = plt.subplots(2, len(QUALITY_SOLVERS), figsize=(11, 7.5), dpi=120, sharex=True, squeeze=False)
    styles = {"unshared": ("black", "-", "o")} | {f"{n} {r}": (c, ls, mk) for n, ls, mk, cs in (
        ("dp", "-", "o", ("#08519c", "#3182bd", "#6baed6")), ("uniform", "--", "x", ("#a63603", "#e6550d", "#fd8d3c")))
        for r, c in zip(RATIOS, cs)}
    for col, solver in enumerate(QUALITY_SOLVERS):
        lines = {}  # label -> [(blocks, fd values, agreement values)]
        for N in step_counts:
            for name, k in quality_settings(N):
                r = min(RATIOS, key=lambda r: abs(max(1, round(r * N)) - k)) if name != "unshared" else None
                per = [res["entries"][f"{p}|{solver}|{N}|{name}|{k}"] for p in paths]
                for label in ([name] if r is None else [f"{name} {r}"]):
                    lines.setdefault(label, []).append((np.mean([e["blocks"] for e in per]), [e["fd"] for e in per],
                                                        [e["agreement"] for e in per]))
        for row, (metric, ylabel) in enumerate((("fd", "Fréchet distance (classifier features)"),
                                                 ("agreement", "class agreement (%)"))):
            ax = axes[row, col]
            for label, pts in lines.items():
                c, ls, mk = styles[label]
                xs = [p[0] for p in pts]
                vals = [p[1 + row] for p in pts]
                mean = [np.mean(v) for v in vals]
                ax.errorbar(xs, mean, yerr=[[m - min(v) for m, v in zip(mean, vals)],
                                            [max(v) - m for m, v in zip(mean, vals)]], color=c, ls=ls, marker=mk,
                            ms=4, lw=1.3, capsize=2, label=label if label == "unshared" else
                            f"{label.split()[0]} K/N = {label.split()[1]}")
            ax.axhline(floor[metric], color="grey", ls=":", label="real images")
            ax.set(xscale="log", ylabel=ylabel, title=solver if row == 0 else None)
            if metric == "fd":
                ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            for axis in [ax.xaxis] + ([ax.yaxis] if metric == "fd" else []):  # plain 20, 50, 100, ...
                axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
                axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if row == 1:
                ax.set_xlabel("block evaluations per image (N = " + ", ".join(map(str, step_counts)) + ")")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with plumbing.atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def load_models(paths, device):
    """The DDTs of `paths` (one config and latent shape), their latent shape; SystemExit for anything else."""
    models, shapes = [], set()
    for path in paths:
        try:
            ckpt = plumbing.load_checkpoint(path)
            models.append(pretrained.load_ddt(path, ckpt=ckpt).to(device).eval())
        except (OSError, plumbing.CheckpointError) as e:
            raise SystemExit(f"--ckpt: {e}") from None
        if not models[-1].cfg.decoder_depth:
            raise SystemExit(f"--ckpt {path} is an improved DiT (decoder_depth 0): no encoder to share")
        shapes.add(tuple(ckpt["data"]["latent_shape"]))
        print(f"{path}: {asdict(models[-1].cfg)}, latents {ckpt['data']['latent_shape']}")
    if len(shapes) > 1 or len({json.dumps(asdict(m.cfg)) for m in models}) > 1:
        raise SystemExit("error: the --ckpt models must share their config and latent shape (one data set)")
    return models, shapes.pop()


def main(argv=None):
    p = plumbing.ArgumentParser(__doc__.split("\n\n")[0].strip())
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--frontier", action="store_true", help="deviation against steps and time for Euler, Adams-2, "
                      "Adams-3, unshared and with K = N/2, at each --num-steps")
    mode.add_argument("--sharing-table", action="store_true", help="the DP against uniform sharing at each "
                      "--encoder-steps, per --num-steps")
    mode.add_argument("--sde-check", metavar="DATA", help="the --sde step rules against the ODE, classified by the "
                      "nearest image of the training set DATA (a prepare_latents.py folder)")
    mode.add_argument("--heatmap", metavar="PNG", help="the first model's cosine cost matrix at the first --num-steps, "
                      "the DP's and the uniform schedule's first --encoder-steps marked")
    mode.add_argument("--quality", metavar="OUT", help="the quality frontier: OUT/quality.json, .md, .png")
    p.add_argument("--ckpt", nargs="+", required=True, help="train.py checkpoints of one data set and config")
    p.add_argument("--num-steps", type=int, nargs="+", default=[100], help="sampling steps (each in turn)")
    p.add_argument("--encoder-steps", type=int, nargs="+", default=[10], help="--sharing-table, --heatmap: K")
    p.add_argument("--batch-size", type=int, default=32, help="images per model and setting (not --quality)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (on 0.3 < t < 1)")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--reference-steps", type=int, default=1000, help="--frontier: Euler steps of the reference")
    p.add_argument("--reference-last-step", type=float, default=0.04, help="--frontier: the reference's last step "
                   "(the samplers' grid ends with a step of 0.04 whatever N is; smaller is nearer the exact ODE)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting, the fastest counts (--quality: 0 "
                   "times nothing; time with nothing else running)")
    p.add_argument("--per-class", type=int, default=10, help="--sde-check: samples per class")
    p.add_argument("--train-data", help="--quality: the models' training set (the classifier learns it)")
    p.add_argument("--val-data", help="--quality: held-out images of the same classes (the Fréchet reference)")
    p.add_argument("--classifier", help="--quality: the classifier file (default OUT/classifier.pt; trained if "
                   "missing)")
    p.add_argument("--num-samples", type=int, default=1000, help="--quality: samples per model and setting")
    args = p.parse_args(argv)
    if args.quality and not (args.train_data and args.val_data):
        p.error("--quality needs --train-data and --val-data")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    models, shape = load_models(args.ckpt, device)
    if args.frontier:
        frontier(models, shape, device, precision, args.num_steps, args.batch_size, args.cfg_scale,
                 args.reference_steps, args.reference_last_step)
    elif args.heatmap:
        N, k = args.num_steps[0], args.encoder_steps[0]
        cost = sample.measure_sharing_cost(models[0], Sampler(N, cfg_scale=args.cfg_scale), shape)
        dp, uni = heatmap(args.heatmap, cost, k, f"{args.ckpt[0]}: N = {N}, guidance {args.cfg_scale}")
        print(f"wrote {args.heatmap}; K = {k}: DP {dp}, uniform {uni}")
    elif args.quality:
        os.makedirs(args.quality, exist_ok=True)
        scorer = quality.Scorer(args.classifier or os.path.join(args.quality, "classifier.pt"), args.train_data,
                                args.val_data)
        res = quality_frontier(args.ckpt, models, shape, device, precision, args.num_steps, args.num_samples,
                               args.cfg_scale, scorer, os.path.join(args.quality, "quality.json"), args.repeats)
        cfg = models[0].cfg
        title = (f"{len(models)} models {cfg.encoder_depth}En{cfg.decoder_depth}De width {cfg.hidden_size} on "
                 f"{args.train_data}, {args.num_samples} samples per model and setting, guidance {args.cfg_scale}; "
                 f"the encoder is {encoder_share(cfg, *shape[1:]):.0%} of a step's FLOPs")
        md = f"{title}\n\n{quality_table(res, args.ckpt, args.num_steps, scorer.floor)}"
        with plumbing.atomic_write(os.path.join(args.quality, "quality.md"), "w") as f:
            f.write(md)
        quality_figure(res, args.ckpt, args.num_steps, scorer.floor, os.path.join(args.quality, "quality.png"), title)
        print(md)
    else:
        for N in args.num_steps:
            if args.sde_check:
                sde_check(models, shape, device, precision, N, args.sde_check, args.per_class, args.cfg_scale)
            else:
                sharing_table(models, shape, device, precision, N, args.encoder_steps, args.batch_size,
                              args.cfg_scale, args.repeats)


if __name__ == "__main__":
    main()
