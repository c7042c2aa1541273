"""Why Adams stops converging to the frontier's Euler-1000 reference: the released time grid ends with one step
of fixed length last_step = 0.04 (t = 0.96 -> 1) whatever N is, so Euler-1000 keeps that step's error. Samples
8 digits images from one model with Euler and Adams-2 at 1,000 steps, with last_step 0.04 (released) and 0.001.
Run from the repository root after the digits commands of the README (32 px digits, runs/digits):
    OMP_NUM_THREADS=1 python -m experiments.last_step_check
Output of the run behind RESULTS.md: assets/frontier/last_step_check.txt."""
import torch
import pretrained
import sample
from experiments.samplers import deviation, eval_batch


def main():
    torch.set_num_threads(1)
    m = pretrained.load_ddt("runs/digits/ckpt.pt").eval()
    noise, y = eval_batch(m, (3, 32, 32), 8, torch.device("cpu"))
    res = {}
    with torch.no_grad():
        for ls in (0.04, 0.001):
            for order in (1, 2):
                res[ls, order] = sample.sample_loop(m, noise, y, sample.Sampler(1000, order, cfg_scale=3.0,
                                                                                last_step=ls))
                print(ls, order, flush=True)
    for ls in (0.04, 0.001):
        print(f"last_step {ls}: Adams-2-1000 vs Euler-1000 deviation {deviation(res[ls, 2], res[ls, 1])[0]:.4f}")
    print(f"Euler-1000: last_step 0.04 vs 0.001 {deviation(res[0.04, 1], res[0.001, 1])[0]:.4f}")
    print(f"Adams-2-1000: last_step 0.04 vs 0.001 {deviation(res[0.04, 2], res[0.001, 1])[0]:.4f} (vs Euler 0.001)")


if __name__ == "__main__":
    main()
