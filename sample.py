"""
Sample images from a DDT with the released samplers (Euler, its stochastic step rules, Adams of order 1-3: one
loop), classifier-free guidance on an interval, and encoder sharing: the condition encoder runs at K of the N
steps, chosen by a dynamic program, and the other steps reuse its z.

    python sample.py --ckpt runs/toy/ckpt.pt --num-samples 16 --out grid.png               # a project checkpoint
    python sample.py --ckpt ddt_xl_256.ckpt --model DDT-XL/2 --vae sd-vae-ft-ema \\
        --classes 207 360 387 974 --cfg-scale 2.0 --out grid.png                            # released weights
    torchrun --nproc_per_node 8 sample.py --ckpt ddt_xl_256.ckpt --model DDT-XL/2 --vae sd-vae-ft-ema \\
        --num-samples 50000 --cfg-scale 2.0 --encoder-steps 125 --npz samples.npz           # ADM evaluator input

The file reads: the time grid, guidance and noise; Sampler (the settings) and sample_loop (the loop); encoder
sharing (the DP and its cost); images out (train.py's grid too); the command line. Sample i's noise depends only
on (--seed, i), so the images do not depend on the number of ranks; with --npz a rerun resumes.
"""

import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import ddt
import plumbing
import pretrained

# -----------------------------------------------------------------------------------------------
# the time grid, guidance, noise


def timesteps(num_steps, last_step=0.04, timeshift=1.0):
    """(N + 1,) float32 times as released: linspace(0, 1 - last_step, N), then 1.0, warped by the shift."""
    if last_step is None or num_steps == 1:
        last_step = 1.0 / num_steps
    t = torch.cat([torch.linspace(0.0, 1.0 - last_step, num_steps), torch.ones(1)])
    return t / (t + (1 - t) * timeshift)


def guided_steps(t, cfg_scale, cfg_interval):
    """Per step: is guidance on? Strictly inside the interval, as released (a t equal to a bound gets none)."""
    lo, hi = cfg_interval
    return [cfg_scale != 1.0 and bool(lo < t_i < hi) for t_i in t]  # t_i float32, compared as released


def plan_halves(guided, encoder_runs):
    """Per step: run the unconditional half too (2B)? At guided steps, and at an encoder step whose z is
    reused by a later guided step: that z must then exist for both halves."""
    both, need = [False] * len(guided), False
    for i in reversed(range(len(guided))):
        need = need or guided[i]
        both[i] = need if encoder_runs[i] else guided[i]
        if encoder_runs[i]:
            need = False
    return both


def image_noise(seed, indices, shape):
    """(noise (len(indices), *shape) float32, generators): image i's noise, and then its SDE steps' noise, come
    from a CPU generator seeded by (seed, i) alone: a sample never depends on its batch or rank."""
    generators = [torch.Generator().manual_seed(plumbing.mix_seed(seed, i)) for i in indices]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators


def adams_coefficients(t, order):
    """Per step i, the weights c_i of the last m = min(order, i + 1) velocities (oldest first), as the released
    AdamLMSampler computes them (lagrange_preint): the integral over [t_i, t_i+1] of the Lagrange basis
    polynomial of each of the nodes t_i-m+1 .. t_i, normalised to sum to 1. The order warms up over the first
    steps (1, 2, ..); order 1 is Euler, c_i = [1.0]. float64 (the released code computes them in float32)."""
    t = t.double().numpy()
    coeffs = []
    for i in range(len(t) - 1):
        nodes, c = t[max(0, i + 1 - order): i + 1], []
        for j in range(len(nodes)):
            others = np.delete(nodes, j)
            basis = np.polyint(np.atleast_1d(np.poly(others)) / np.prod(nodes[j] - others))  # integral of l_j
            c.append(np.polyval(basis, t[i + 1]) - np.polyval(basis, t[i]))
        coeffs.append([float(c_j / sum(c)) for c_j in c])
    return coeffs


# the released stochastic step rules: x + v dt + a s w dt + sqrt(b w dt) eps, name -> (a, b)
SDE_RULES = {"sde": (1.0, 2.0), "sde-mean": (1.0, 0.0), "sde-preserve": (0.5, 1.0)}

# -----------------------------------------------------------------------------------------------
# the sampler


@dataclass(frozen=True)
class Sampler:
    """How to sample: the released samplers' settings (defaults: Euler, 250 steps, no guidance)."""
    num_steps: int = 250
    order: int = 1  # 1: Euler (EulerSampler); 2, 3: Adams (AdamLMSampler, released default 2)
    sde: str = "none"  # a stochastic step rule of SDE_RULES (order 1 only), or the ODE
    cfg_scale: float = 1.0  # guidance v_null + cfg_scale (v_cond - v_null)
    cfg_interval: tuple = (0.3, 1.0)  # ... only while interval_min < t < interval_max
    last_step: float = 0.04  # the length of the final step to t = 1 (None: 1 / num_steps)
    timeshift: float = 1.0  # time grid warp t / (t + (1 - t) shift)
    both_halves: bool = False  # run the unconditional half at every step, as released (the same result, slower)

    def __post_init__(self):  # each message names the flag of sample.py that sets the field
        for name, lo, hi, open_lo in (("num_steps", 1, None, False), ("order", 1, 3, False),
                                      ("cfg_scale", None, None, False), ("timeshift", 0, None, True)):
            plumbing.check_number("--" + name.replace("_", "-"), getattr(self, name), lo, hi, open_lo)
        if self.last_step is not None:
            plumbing.check_number("--last-step", self.last_step, 0, 1, open_lo=True)
        lo, hi = self.cfg_interval
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"cfg_interval (--cfg-interval) must be two finite numbers, MIN < MAX: got {lo} {hi}")
        if self.sde != "none" and (self.sde not in SDE_RULES or self.order != 1):  # released Adams: the ODE only
            raise ValueError(f"sde must be 'none' or, with order 1, one of {list(SDE_RULES)}: got {self.sde!r}, "
                             f"order {self.order}")


@torch.no_grad()
def sample_loop(model, noise, y, sampler=Sampler(), encoder_steps=None, generators=None, watch=None):
    """The one sampling loop: from noise (t = 0) to data (t = 1) on the released times; returns the final x.
    Each step computes the velocity v_i, guided inside the interval, then moves x by the solver's rule:

        order 1 (Euler), 2, 3 (Adams):  x <- x + (t_i+1 - t_i) * sum_j c_ij v_i-m+1+j   (c: adams_coefficients)
        sde in SDE_RULES (order 1):     x <- x + v_i dt + a score w dt + sqrt(b w dt) eps,
                                        score = (t v_i - x) / (1 - t), w = 1 - t (the linear scheduler's sigma(t)),
                                        eps from `generators` (one per image: image_noise); the last step is the
                                        ODE step, as released

    Guidance runs the unconditional half (the null class) only where it is needed. `encoder_steps`: sorted steps
    where the encoder runs (None: every step; must start with 0); the other steps reuse the latest z. `watch(i, n,
    z)`, if given, is called after each network call with the images it ran (n = B or 2B, conditional half
    first) and the z it computed (None where it reused one): to count or record, never to change the result."""
    s, B, N = sampler, noise.shape[0], sampler.num_steps  # N steps; s: the settings (the score is `score`)
    if encoder_steps is not None and not model.cfg.decoder_depth:
        raise ValueError("encoder_steps: an improved DiT (decoder_depth 0) has no z to share")
    encoder_runs = encoder_schedule(N, encoder_steps)
    if s.sde != "none" and SDE_RULES[s.sde][1] and (generators is None or len(generators) != B):
        raise ValueError(f"sde={s.sde!r} draws noise from one generator per image: pass generators (image_noise)")
    t = timesteps(N, s.last_step, s.timeshift)
    coeffs = adams_coefficients(t, s.order)
    guided = guided_steps(t[:N], s.cfg_scale, s.cfg_interval)
    both = [True] * N if s.both_halves else plan_halves(guided, encoder_runs)
    t = t.to(noise.device, noise.dtype)
    y2 = torch.cat([y, torch.full_like(y, model.cfg.num_classes)])  # (2B,) conditional half first, then null
    x, z, history = noise, None, []  # history: the last `order` velocities
    for i in range(N):
        n = 2 * B if both[i] else B
        v, z_i, _ = model(torch.cat([x, x]) if both[i] else x, t[i].repeat(n), y2[:n],
                          None if encoder_runs[i] else z[:n])
        z = z_i if encoder_runs[i] else z  # (n, tokens, D), reused until the next encoder step
        if watch is not None:
            watch(i, n, z_i if encoder_runs[i] else None)
        v = v.float()  # guidance and the step in float32, also under bf16 autocast
        v = v[B:] + s.cfg_scale * (v[:B] - v[B:]) if guided[i] else v[:B]
        dt, history = t[i + 1] - t[i], (history + [v])[-s.order:]
        if s.sde == "none" or i == N - 1:  # Euler / Adams: a weighted sum of the last velocities
            x = x + sum(c * v_j for c, v_j in zip(coeffs[i], history[-len(coeffs[i]):])) * dt
        else:
            (a, b), w = SDE_RULES[s.sde], 1 - t[i]
            score = (t[i] * v - x) / (1 - t[i])  # from v, for the linear scheduler (alpha = t, sigma = 1 - t)
            x = x + v * dt + a * score * w * dt
            if b:
                eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device)
                x = x + torch.sqrt(b * w * dt) * eps
    return x


def encoder_schedule(num_steps, encoder_steps):
    """Per step: does the encoder run? `encoder_steps` (None: all) checked: sorted, distinct, from step 0."""
    steps = list(range(num_steps) if encoder_steps is None else encoder_steps)
    if not steps or steps[0] != 0 or steps != sorted(set(steps)) or steps[-1] >= num_steps:
        raise ValueError(f"encoder_steps must be sorted distinct steps in [0, {num_steps}) starting with 0, "
                         f"got {steps}")
    return [i in set(steps) for i in range(num_steps)]


def count_evals(counts):
    """A `watch` for sample_loop that adds to `counts` (a Counter) the images through the encoder and the decoder."""
    return lambda i, n, z: counts.update(encoder=n if z is not None else 0, decoder=n)


# -----------------------------------------------------------------------------------------------
# encoder sharing


def solve_sharing(cost, k):
    """The k encoder steps R (sorted, R[0] = 0) minimizing sum_i cost[i, r(i)], r(i) = max{a in R: a <= i}.

    A segment [a, b) served by the encoder run at step a costs seg[a, b] = sum_{i=a}^{b-1} cost[i, a]
    (column cumulative sums). F[m, b], the best cost of steps 0..b-1 with m runs, the last segment ending
    at b, obeys  F[1, b] = seg[0, b],  F[m, b] = min_{a < b} F[m-1, a] + seg[a, b];  the answer is F[k, N],
    and back-tracking the minimizing a's gives R. Exact, O(k N^2) time. Infinite entries (reuse that was not
    measured) are never used; a ValueError says so if k runs cannot avoid them.
    """
    cost = np.asarray(cost.detach().cpu() if torch.is_tensor(cost) else cost, dtype=np.float64)
    cost = np.tril(cost)  # cost[i, a] for a <= i only: a step reuses an earlier z, never a later one
    N = cost.shape[0]
    if cost.shape != (N, N):
        raise ValueError(f"cost must be a square matrix, got shape {cost.shape}")
    if not 1 <= k <= N:
        raise ValueError(f"--encoder-steps must be between 1 and the number of steps {N}, got {k}")
    P = np.concatenate([np.zeros((1, N)), np.cumsum(cost, axis=0)])  # P[b, a] = sum_{i<b} cost[i, a]
    seg = P.T - np.diagonal(P)[:, None]  # (N, N + 1): seg[a, b] = P[b, a] - P[a, a]
    seg[np.arange(N + 1)[None, :] <= np.arange(N)[:, None]] = math.inf  # empty segments: b <= a
    F_, arg = np.full((k + 1, N + 1), math.inf), np.zeros((k + 1, N + 1), dtype=np.int64)
    F_[1] = seg[0]
    for m in range(2, k + 1):
        total = F_[m - 1, :N, None] + seg  # (a, b)
        arg[m], F_[m] = total.argmin(axis=0), total.min(axis=0)
    if F_[k, N] == math.inf:
        raise ValueError(f"no schedule of {k} encoder steps avoids the infinite (unmeasured) entries of the cost")
    steps, b = [], N
    for m in range(k, 1, -1):
        b = int(arg[m, b])
        steps.append(b)
    return [0] + steps[::-1]


def sharing_cost(cost, steps):
    """sum_i cost[i, r(i)] of a schedule (the objective solve_sharing minimizes)."""
    cost = np.asarray(cost, dtype=np.float64)
    r = np.maximum.accumulate(np.isin(np.arange(len(cost)), steps) * np.arange(len(cost)))
    return float(cost[np.arange(len(cost)), r].sum())


def uniform_schedule(n, k):
    """The baseline: k steps spread evenly over n, [round(i * n / k)], distinct since n / k >= 1."""
    if not 1 <= k <= n:
        raise ValueError(f"--encoder-steps must be between 1 and the number of steps {n}, got {k}")
    return [(2 * i * n + k) // (2 * k) for i in range(k)]  # round half up, in integers


def measure_sharing_cost(model, sampler, latent_shape, batch_size=8):
    """The paper's proxy: (N, N) float64 cost[i, j] = 1 - cos(z_i, z_j) over D, averaged over the tokens and both
    guidance halves (as the released sharing_dp) of images 0..batch_size-1 of seed 0, labels spread over the
    classes, from one run of `sampler` (its trajectory) with the encoder and both halves at every step."""
    num_classes, device = model.cfg.num_classes, next(model.parameters()).device
    y = torch.tensor([i * num_classes // batch_size for i in range(batch_size)], device=device)
    noise, generators = image_noise(0, range(batch_size), latent_shape)  # the generators: for the SDE steps
    zs = []  # num_steps x (2B, tokens, D)
    sample_loop(model, noise.to(device), y, replace(sampler, both_halves=True), None, generators,
                watch=lambda i, n, z: zs.append(z.float().cpu()))
    N = sampler.num_steps
    gram = torch.zeros(N, N, dtype=torch.float64)
    for b in range(2 * batch_size):  # one image at a time keeps the float64 copy small
        zb = F.normalize(torch.stack([z[b] for z in zs]).double(), dim=-1).flatten(1)  # (N, tokens * D)
        gram += zb @ zb.T
    return (1.0 - gram / (2 * batch_size * zs[0].shape[1])).numpy()


# -----------------------------------------------------------------------------------------------
# images out


@torch.no_grad()
def to_uint8(x, vae=None, scale=1.0):
    """Samples (B, C, h, w) -> uint8 images (B, H, W, 3) from [-1, 1], rounded as the released code does (ADM
    truncates); latents decoded by `vae` first, in float32, 16 at a time (80 at once would need ~10 GB)."""
    if vae is not None:
        x = torch.cat([vae.decode(part.float() / scale) for part in x.split(16)])
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def class_grid(model, vae, meta, path, seed=0, num_steps=50, precision="fp32"):
    """train.py's grid: 8 Euler samples for each of (at most) 10 classes spread over the dataset's, under the run's
    precision; `vae` decodes latents (None in pixel space). Under torchrun a collective: each rank samples a share
    of the images (image i's noise from (seed, i), as always), rank 0 writes the grid."""
    rank, world = plumbing.rank_world()
    num_classes, device = meta["num_classes"], next(model.parameters()).device
    labels = [c for c in list(range(0, num_classes, max(1, num_classes // 10)))[:10] for _ in range(8)]
    mine = range(rank * len(labels) // world, (rank + 1) * len(labels) // world)
    noise = image_noise(seed, mine, meta["latent_shape"])[0].to(device)
    with plumbing.autocast(device, precision):
        x = sample_loop(model, noise, torch.tensor(labels[mine.start:mine.stop], device=device), Sampler(num_steps))
    images = plumbing.gather_to_rank0(dict(zip(mine, to_uint8(x, vae, meta["scaling_factor"]))))
    if rank == 0:
        plumbing.save_grid(path, np.stack([images[i] for i in range(len(labels))]), labels, meta.get("class_names"))


# -----------------------------------------------------------------------------------------------
# command line

GRID_MAX = 100  # a grid shows at most this many images: one of 50k helps nobody


def main(argv=None):
    args, sampler = parse_args(argv)
    rank, _, world, device = plumbing.setup_dist(tf32=args.precision != "fp32")
    lock = None
    try:
        if rank == 0 and args.npz:  # one run per --npz: a second would delete this one's parts in flight
            lock = plumbing.lock_file(args.npz + ".lock", "--npz", args.npz, "sample.py")
        with plumbing.stop_signals() as received:
            run(args, sampler, device, received)
    finally:
        if lock is not None:
            plumbing.unlock(lock, remove=True)
        plumbing.cleanup_dist()


def run(args, sampler, device, received):
    """Load the model, choose the encoder steps, sample this rank's batches (resumable), gather and write."""
    rank, world = plumbing.rank_world()
    model, vae, info = pretrained.load_for_sampling(args, device)
    classes = args.classes if args.classes is not None else list(range(model.cfg.num_classes))  # checked there
    n = args.num_samples or (len(args.classes) if args.classes else 8)
    if n > GRID_MAX and not args.npz:
        print(f"without --npz only the {GRID_MAX} images of the grid are sampled, not {n}")
        n = GRID_MAX
    labels = [classes[i % len(classes)] for i in range(n)]  # balanced when n is a multiple of len(classes)
    cache_dirs = [os.path.dirname(os.path.abspath(path)) for path in (args.ckpt, args.npz or args.out)]
    steps = plumbing.from_rank0(sharing_schedule(args, sampler, model, info["latent_shape"], cache_dirs)
                                if rank == 0 else None)
    settings = dict(weights=info["digest"], seed=args.seed, sampler=asdict(sampler), encoder_steps=steps,
                    precision=args.precision, vae=args.vae, classes=classes, latent_shape=list(info["latent_shape"]),
                    model=asdict(model.cfg))
    parts = plumbing.Parts(args.npz, settings, n, args.batch_size)
    t0 = time.time()
    kept, count = sample_batches(model, vae, info, parts, labels, (sampler, steps), args, received)
    kept = plumbing.gather_to_rank0(kept)
    done = sum(e - s for s, e in parts.todo)
    enc, dec = (int(c) for c in plumbing.sum_over_ranks([count["encoder"], count["decoder"]], device))
    if rank != 0:
        return
    secs = time.time() - t0
    print(f"sampled {done} images, {sampler.num_steps} steps each, in {secs:.1f} s ({done / max(secs, 1e-9):.2f} "
          f"images/s)")
    if steps is not None:  # what sharing saved, counted in network passes over one image
        print(f"encoder sharing: the encoder ran at {len(steps)} of the {sampler.num_steps} steps, {enc} passes over "
              f"one image against the decoder's {dec} (a guided step makes two passes: with and without the class)")
    try:  # a write that fails here, though checked at the start (a full disk), says what is kept
        images = parts.join(labels, received) if args.npz else np.stack([kept[i] for i in range(n)])
        if args.out:
            plumbing.save_grid(args.out, images[:GRID_MAX], labels[:GRID_MAX], info["class_names"])
            print(f"wrote {args.out}" + (f" (the first {GRID_MAX} of {n} images)" if n > GRID_MAX else ""))
    except OSError as e:
        where = f"the samples are in {args.npz if os.path.exists(args.npz) else parts.dir}" if args.npz else \
            "the samples are lost (--npz keeps them as they are made)"
        raise SystemExit(f"error: cannot write {e.filename} ({e.strerror}); {where}") from None


def sample_batches(model, vae, info, parts, labels, schedule, args, received):
    """This rank's share of the batches left (parts.todo), sampled with `schedule` (Sampler, encoder steps), decoded,
    saved as parts (--npz) or kept: ({index: uint8 image}, a Counter of the encoder's and decoder's images). A stop
    signal, checked before each batch on every rank, ends every rank with EXIT_STOPPED, keeping the parts."""
    (sampler, steps), count = schedule, Counter()
    rank, world = plumbing.rank_world()
    kept, mine, device = {}, parts.todo[rank::world], next(model.parameters()).device
    rounds = math.ceil(len(parts.todo) / world)  # the same on every rank: the stop check is a collective
    for r in tqdm(range(rounds), disable=rank != 0, desc=f"sampling on {world} rank(s)"):
        if stop := plumbing.stop_requested(received, device):
            raise plumbing.stopped(stop, f"the finished batches are kept in {parts.dir}" if parts.dir else
                                   "nothing is kept without --npz")
        if r == len(mine):  # this rank's last round is empty
            continue
        s, e = mine[r]
        noise, generators = image_noise(args.seed, range(s, e), info["latent_shape"])  # (b, C, H, W), generators
        with plumbing.autocast(device, args.precision):
            x = sample_loop(model, noise.to(device), torch.tensor(labels[s:e], device=device), sampler, steps,
                            generators, watch=count_evals(count))
        img = to_uint8(x, vae, info["scale"])  # (b, H, W, 3) uint8
        if parts.dir:
            plumbing.save_npz(parts.path(s, e), img, labels[s:e])
        else:
            kept.update(zip(range(s, e), img))
    return kept, count


def sharing_schedule(args, sampler, model, latent_shape, cache_dirs):
    """--encoder-steps K: evenly spread (--sharing uniform), or the DP's on the paper's cost measured along the
    solver's trajectory, cached as JSON by the checkpoint (else the output), keyed by all it depends on."""
    N, k = sampler.num_steps, args.encoder_steps or sampler.num_steps
    if k == N:
        return None
    if args.sharing == "uniform":
        print(f"encoder steps (uniform): {(steps := uniform_schedule(N, k))}")
        return steps
    key = json.dumps(dict(sharing=args.sharing, k=k, sampler=asdict(sampler), latent_shape=list(latent_shape),
                          precision=args.precision, device=next(model.parameters()).device.type,
                          model=asdict(model.cfg), ckpt_bytes=os.path.getsize(args.ckpt),
                          ckpt_mtime=os.path.getmtime(args.ckpt)))
    paths = [os.path.join(d, os.path.basename(args.ckpt) + ".sharing.json") for d in cache_dirs]
    entry, path = plumbing.json_cache(paths, key, lambda: dp_schedule(model, sampler, latent_shape, k, args.precision))
    print(f"encoder steps (DP, reuse cost {entry['cost']:.4f} vs uniform {entry['uniform_cost']:.4f}"
          + (f", cached in {path}" if path else "") + f"): {entry['steps']}")
    return entry["steps"]


def dp_schedule(model, sampler, latent_shape, k, precision):
    """{steps: the DP's k encoder steps on the measured cost, cost: their reuse cost, uniform_cost: uniform's}."""
    with plumbing.autocast(next(model.parameters()).device, precision):
        cost = measure_sharing_cost(model, sampler, latent_shape)
    steps = solve_sharing(cost, k)
    return dict(steps=steps, cost=sharing_cost(cost, steps),
                uniform_cost=sharing_cost(cost, uniform_schedule(sampler.num_steps, k)))


def parse_args(argv=None):
    """(args, Sampler): the flags, every one checked before any work."""
    p = plumbing.ArgumentParser(__doc__.split("\n\n")[0])
    count, real, add = plumbing.number(int, 1), plumbing.number(float), p.add_argument
    add("--ckpt", required=True, help="project checkpoint, or a released Lightning one (see --model)")
    add("--model", choices=list(ddt.PRESETS), metavar="PRESET",
        help="the preset of a released checkpoint (default DDT-XL/2): one of " + ", ".join(ddt.PRESETS))
    add("--image-size", type=plumbing.number(int, 8), default=256, help="released checkpoints: image size")
    add("--vae", help="SD-VAE folder or weights file (latent models only)")
    add("--classes", type=plumbing.number(int, 0), nargs="+", help="class of each sample (cycled)")
    add("--num-samples", type=count, help="default: len(--classes), else 8")
    add("--num-steps", type=count, default=250, help="solver steps N (the paper: 250)")
    add("--solver", choices=["euler", "adams"], default="euler", help="the released EulerSampler or AdamLMSampler")
    add("--order", type=int, choices=[1, 2, 3], help="--solver adams: past velocities a step combines (default 2)")
    add("--sde", choices=["none", *SDE_RULES], default="none", help="--solver euler: a released stochastic step")
    add("--cfg-scale", type=real, default=1.0, help="guidance scale (paper: 2.0 at 256 px)")
    add("--cfg-interval", type=real, nargs=2, default=[0.3, 1.0], metavar=("MIN", "MAX"),
        help="guidance only while MIN < t < MAX")
    add("--timeshift", type=plumbing.number(float, 0, open_lo=True), default=1.0, help="time grid warp")
    add("--last-step", type=plumbing.number(float, 0, 1, open_lo=True), default=0.04, help="the final step's length")
    add("--seed", type=plumbing.number(int, 0), default=0, help="noise of sample i comes from (seed, i)")
    add("--encoder-steps", type=count, help="encoder runs K (default: every step)")
    add("--sharing", choices=["dp", "uniform"], default="dp", help="which K steps: the paper's DP, or evenly spread")
    add("--batch-size", type=count, default=32, help="per rank")
    add("--out", help="labelled grid image (default samples.png without --npz)")
    add("--npz", help="ADM-evaluator .npz (arr_0 uint8 NHWC, arr_1 int64 labels)")
    add("--precision", choices=["bf16", "fp32"], help="default: bf16 on a GPU, fp32 on the CPU")
    add("--allow-pickle", action="store_true", help="trust a checkpoint that needs pickle")
    args = p.parse_args(argv)
    if args.order is not None and args.solver != "adams":
        p.error(f"--order {args.order} is for --solver adams (Euler is order 1); add --solver adams or drop --order")
    if args.sde != "none" and args.solver != "euler":
        p.error(f"--sde {args.sde} is for --solver euler: the released AdamLMSampler has only the ODE step")
    if args.encoder_steps is not None and args.encoder_steps > args.num_steps:
        p.error(f"--encoder-steps must be at most --num-steps ({args.num_steps}), got {args.encoder_steps}")
    try:
        sampler = Sampler(args.num_steps, (args.order or 2) if args.solver == "adams" else 1, args.sde,
                          args.cfg_scale, tuple(args.cfg_interval), args.last_step, args.timeshift)
    except ValueError as e:
        p.error(str(e))
    args.out = args.out or (None if args.npz else "samples.png")
    plumbing.check_writable(("--out", args.out), ("--npz", args.npz))  # before sampling, not after
    plumbing.device_defaults(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return args, sampler


if __name__ == "__main__":
    main()
