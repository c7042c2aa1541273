"""
The ADM evaluator's metrics (openai/guided-diffusion `evaluations/evaluator.py`: Inception Score, FID, sFID,
precision, recall) in plain torch and numpy, and FD_DINOv2 as EDM2 computes it. No TensorFlow and no download
at run time: the InceptionV3 of TensorFlow's 2015-12-05 graph loads from the converted weights that
torch-fidelity and pytorch-fid publish.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples.npz --inception weights-inception-2015-12-05-6726825d.pth
    python evaluate.py ref.npz samples.npz --inception W --dino dinov2_vitl14_pretrain.pth --json metrics.json
    # a reference batch of your own data: an image folder (ADM centre crop) or a prepare_latents.py --images dataset
    python evaluate.py --make-ref /data/val --out ref.npz --inception W --resolution 256 --num-images 10000

An .npz holds `arr_0`, uint8 images (N, H, W, 3) (sample.py --npz writes it). A reference batch may also hold
`mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial) statistics, used instead of its images' when present as
ADM does, and `mu_dinov2`, `sigma_dinov2`. The file reads like the evaluator it replaces: the Inception network
(bottom-up), feature extraction, the statistics (small functions, each naming the ADM function it equals: numpy,
but torch for the pairwise distances of precision/recall, which run on the GPU when there is one), reference
batches; then train.py's validation loss on held-out latents; the command line.
"""

import glob
import json
import math
import os
import struct
import sys
import time
import warnings
import zipfile
from statistics import NormalDist

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import plumbing
import pretrained
from prepare_latents import OUTPUT_FILES, center_crop_arr, read_meta  # the ADM/DiT centre crop: the reference is
# cropped as the training set; the file names that make a folder a prepare_latents.py dataset, and its meta.json

# -----------------------------------------------------------------------------------------------
# InceptionV3 of TF's 2015-12-05 graph (the one ADM, TTUR and every FID table use). Parameter names are
# torchvision's Inception3 names, which both converted weight files use. It differs from torchvision's network
# in three places: the TF1 input resize, average pools that ignore the zero padding, a max pool in Mixed_7c.


def resize_bilinear_tf1(x, size):
    """TF1's ResizeBilinear (align_corners=False, no half-pixel centres), which the graph applies to its input:
    output pixel i reads input coordinate i * in / out (F.interpolate reads (i + 0.5) * in / out - 0.5), between
    floor and floor + 1 (clamped to the last pixel), linearly weighted. x (B, C, H, W) float32 -> (B, C, size, size)."""
    def axis(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size)  # float32 as TF
        lo = src.long()  # floor: src >= 0
        return lo, (lo + 1).clamp(max=n_in - 1), src - lo
    (y0, y1, dy), (x0, x1, dx) = axis(x.shape[-2]), axis(x.shape[-1])
    top, bottom = x[:, :, y0], x[:, :, y1]  # (B, C, size, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx  # (B, C, size, size)
    return top + (bottom - top) * dy[:, None]


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TF's eps 1e-3), ReLU: every layer of the graph."""

    def __init__(self, c_in, c_out, **conv):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):  # TF's average pool leaves the zero padding out of the mean (torchvision's counts it)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b-d, 35 x 35: 1x1 | 1x1, 5x5 | 1x1, 3x3, 3x3 | avg pool, 1x1
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x))], dim=1)  # (B, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):  # Mixed_6a, 35 -> 17: 3x3 stride 2 | 1x1, 3x3, 3x3 stride 2 | max pool
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)  # (B, 768, 17, 17)


class InceptionC(nn.Module):  # Mixed_6b-e, 17 x 17: 1x1 | 1x1, 1x7, 7x1 | 1x1, 7x1, 1x7, 7x1, 1x7 | avg pool, 1x1
    def __init__(self, c_in, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(b)),
                          self.branch_pool(avg_pool_3x3(x))], dim=1)  # (B, 768, 17, 17), the 1x1 branch first


class InceptionD(nn.Module):  # Mixed_7a, 17 -> 8: 1x1, 3x3 stride 2 | 1x1, 1x7, 7x1, 3x3 stride 2 | max pool
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)  # (B, 1280, 8, 8)


class InceptionE(nn.Module):  # Mixed_7b-c, 8 x 8: 1x1 | 1x1, (1x3 & 3x1) | 1x1, 3x3, (1x3 & 3x1) | pool, 1x1
    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool  # "avg" in Mixed_7b; "max" in Mixed_7c, where the 2015 graph has a max pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                          self.branch3x3dbl_3b(b), self.branch_pool(p)], dim=1)  # (B, 2048, 8, 8)


class InceptionV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # the graph's 1008 classes; IS uses the weight only (ADM's unbiased logits)

    def forward(self, images):
        """uint8 images (B, 3, H, W), any size -> pool_3 (B, 2048), spatial (B, 2023), unbiased logits (B, 1008)."""
        x = resize_bilinear_tf1(images.float(), 299)
        x = (x - 128) / 128  # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))  # (B, 32, 147, 147)
        x = F.max_pool2d(self.Conv2d_2b_3x3(x), 3, stride=2)  # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (B, 768, 17, 17)
        x = self.Mixed_6d(x)  # its first 192 channels are its 1x1 branch: TF's `mixed_6/conv:0`
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # (B, 17 * 17 * 7) in TF's (row, column, channel) order
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048): `pool_3:0`
        return pool, spatial, pool @ self.fc.weight.T  # (B, 1008): `softmax/logits/MatMul`, before the bias


def load_inception(path):
    """The Inception network from torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` or pytorch-fid's
    `pt_inception-2015-12-05-6726825d.pth`. Both are TF's 2015-12-05 weights under torchvision's Inception3
    names; a torchvision state dict also carries BatchNorm's num_batches_tracked counters, which are accepted
    and unused. Strict (every weight, no other key), weights_only; float32, eval, frozen."""
    try:
        sd = pretrained.load_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--inception {path}: no such file; download torch-fidelity's "
                                f"weights-inception-2015-12-05-6726825d.pth or pytorch-fid's "
                                f"pt_inception-2015-12-05-6726825d.pth") from None
    model = InceptionV3()
    own = {k: v for k, v in model.state_dict().items() if not k.endswith(".num_batches_tracked")}
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"--inception {path} is not a state dict of tensors (got {type(sd).__name__})")
    sd = {k: v for k, v in sd.items() if not k.endswith(".num_batches_tracked")}
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"--inception {path} is not the InceptionV3 of TF's 2015-12-05 graph in torch-fidelity's or "
                         f"pytorch-fid's layout: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                         f"shapes {shapes[:4]} ({len(missing)}, {len(unexpected)}, {len(shapes)} in all)")
    model.load_state_dict(sd, strict=True)  # BatchNorm fills in its own num_batches_tracked
    return model.float().eval().requires_grad_(False)


# -----------------------------------------------------------------------------------------------
# feature extraction


def batches(images, batch_size, desc):
    """uint8 (N, H, W, 3) array-like (array, memmap, FolderImages) -> (start row, uint8 numpy (B, H, W, 3)) in
    order, each image read once, with a tqdm bar in images/s."""
    with tqdm(total=len(images), desc=desc, unit="img", file=sys.stderr) as bar:
        for i in range(0, len(images), batch_size):
            batch = np.asarray(images[i: i + batch_size])
            yield i, batch
            bar.update(len(batch))


def to_device(batch, device):
    """uint8 numpy (B, H, W, 3) -> uint8 tensor (B, 3, H, W) on `device` (a copy: memmaps are read-only)."""
    return torch.from_numpy(np.array(batch)).to(device).permute(0, 3, 1, 2)


@torch.no_grad()
def inception_batch(model, batch):
    """uint8 images (B, H, W, 3) -> (pool (B, 2048), spatial (B, 2023), logits (B, 1008)) float32 numpy, ADM's
    compute_activations and the logits of its softmax graph. Float32 on the model's device, TF32 off as TF ran."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        return tuple(f.cpu().numpy() for f in model(to_device(batch, next(model.parameters()).device)))


def inception_features(model, images, batch_size=64):
    """inception_batch over uint8 images (N, H, W, 3), N >= 1: (pool (N, 2048), spatial (N, 2023), logits (N, 1008))."""
    out = [inception_batch(model, batch) for _, batch in batches(images, batch_size, "Inception")]
    return tuple(np.concatenate(o) for o in zip(*out))


@torch.no_grad()
def dino_batch(dino, batch):
    """FD_DINOv2's features as EDM2 computes them (calculate_metrics.py, DINOv2Detector, resize_mode 'torch'):
    uint8 images (B, H, W, 3) resized to 224 x 224 (bicubic, antialiased), / 255, ImageNet mean/std, then the
    class token after the final norm -> float32 numpy (B, D). `dino`: pretrained.load_dino(path, pos_rule="hub"), the
    hub model's position-embedding rule."""
    if dino.pos_rule != "hub":
        raise ValueError("FD_DINOv2 needs the hub model's position embeddings: "
                         "pretrained.load_dino(path, pos_rule='hub')")
    x = to_device(batch, next(dino.parameters()).device)
    x = F.interpolate(x.float(), size=(224, 224), mode="bicubic", antialias=True)  # (B, 3, 224, 224) in 0..255
    return dino.tokens((x / 255 - dino.mean) / dino.std)[:, 0].float().cpu().numpy()  # (B, D)


def dino_features(dino, images, batch_size=64):
    """dino_batch over uint8 images (N, H, W, 3), N >= 1 -> float32 numpy (N, D)."""
    return np.concatenate([dino_batch(dino, batch) for _, batch in batches(images, batch_size, "DINOv2")])


# -----------------------------------------------------------------------------------------------
# the statistics, as ADM computes them


def feature_statistics(features):
    """ADM's compute_statistics: np.mean and np.cov (rows are samples) of the float32 features. As in ADM the
    mean stays float32 (numpy's pairwise summation) and the covariance is float64; a float64 mean moves FID by
    ~1e-7 relative, against ~1e-8 from ADM's own numbers this way (testdata/adm_evaluator_stats.npz)."""
    features = np.asarray(features, dtype=np.float32)
    return features.mean(axis=0), np.cov(features, rowvar=False)


class StreamingStatistics:
    """ADM's compute_statistics (np.mean, np.cov with rows as samples) of features that come in batches, for
    sources too large to hold: in float64, the mean and centred sum of outer products of each block of `block`
    rows merged into the running ones (the pairwise update of Chan, Golub and LeVeque), so memory is O(D^2 +
    block D) whatever the number of rows, and the result is np.cov's up to float64 rounding. Also the
    per-feature minimum and maximum, for check_features."""

    def __init__(self, block=1024):
        self.n, self.block, self.pending = 0, block, []

    def update(self, x):
        self.pending.append(np.asarray(x, dtype=np.float64))  # (B, D)
        if sum(map(len, self.pending)) >= self.block:  # merged in blocks: fewer, larger products
            self.merge()

    def merge(self):
        if not self.pending:
            return
        x, self.pending = np.concatenate(self.pending), []
        if len(x) == 0:
            return
        if self.n == 0:
            D = x.shape[1]
            self.mean, self.m2 = np.zeros(D), np.zeros((D, D))
            self.lo, self.hi = np.full(D, math.inf), np.full(D, -math.inf)
        mean = x.mean(axis=0)
        delta, n = mean - self.mean, self.n + len(x)
        self.m2 += (x - mean).T @ (x - mean)
        self.m2 += np.outer(delta, delta) * (self.n * len(x) / n)
        self.mean += delta * (len(x) / n)
        self.n = n
        self.lo, self.hi = np.minimum(self.lo, x.min(axis=0)), np.maximum(self.hi, x.max(axis=0))

    def result(self):
        """(mu float64 (D,), sigma float64 (D, D)), like np.mean and np.cov of all the rows."""
        self.merge()
        return self.mean, self.m2 / (self.n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM's FIDStatistics.frechet_distance: |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrtm(sigma1 sigma2).
    The trace of the square root is the sum of the square roots of the eigenvalues of sigma1 sigma2, taken here
    from the symmetric matrix sqrt(sigma1) sigma2 sqrt(sigma1) that has the same eigenvalues (two eigh calls,
    not scipy's sqrtm). Like ADM's retry (which it makes when sqrtm's result is not finite), a failed
    eigendecomposition is retried with eps added to both diagonals. An eigenvalue below -1e-6 (whose square root
    has an imaginary part above 1e-3) raises the "Imaginary component" error; smaller ones are rounding and count
    as 0. That is not ADM's test, which raises when an entry on the diagonal of scipy's sqrtm(sigma1 sigma2) has
    an imaginary part above 1e-3 (np.allclose, atol 1e-3): the two return the same number where no eigenvalue is
    near that bound, as with the covariances of more images than dimensions; but on rank-deficient covariances
    (fewer images than dimensions) of large magnitude, both look at rounding noise, and either may raise where
    the other returns a number (docs/history.md, Evaluation, measures such cases)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("the statistics are not finite (NaN or inf in mu or sigma)")
    diff = mu1 - mu2
    for offset in (0.0, eps):
        try:
            w, v = np.linalg.eigh(sigma1 + offset * np.eye(len(sigma1)))
            root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # sqrt(sigma1): symmetric, PSD
            ev = np.linalg.eigvalsh(root1 @ (sigma2 + offset * np.eye(len(sigma2))) @ root1)
            break
        except np.linalg.LinAlgError:
            if offset:
                raise ValueError("the square root of sigma1 sigma2 did not converge, even with eps on the diagonals")
            warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
    if ev.min() < -1e-6:
        raise ValueError(f"Imaginary component {np.sqrt(-ev.min())}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def inception_score(logits, split_size=5000):
    """ADM's compute_inception_score: softmax of the unbiased logits in float32 (as TF), then per split of
    `split_size` images exp(mean KL(p(y|x) || p(y))), averaged over the splits (a last, partial split counts
    as one, as in ADM)."""
    logits = np.asarray(logits, dtype=np.float32)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds = e / e.sum(axis=1, keepdims=True)
    scores = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(0, len(preds), split_size):
            part = preds[i: i + split_size]
            kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
            scores.append(np.exp(np.mean(np.sum(kl, 1))))
    score = float(np.mean(scores))
    if not np.isfinite(score):
        raise ValueError("the Inception Score is not finite: a class probability is 0 in float32 (extreme logits)")
    return score


def pairwise_distances(U, V):
    """ADM's DistanceBlock: squared distances max(|u|^2 - 2 u.v + |v|^2, 0) between the rows of U (n, D) and
    V (m, D), computed in float16 (every operation rounded to float16, sums and products accumulated in float32
    as GPU kernels do), or in float32 where the float16 block is not finite. -> float32 (n, m). As in TF, the
    check comes after the max with 0: a 2 u.v that overflows float16 (above 65504) while the norms do not makes
    a -inf, which the max turns into 0, so the float16 block is kept."""
    def f16(t):
        return t.half().float()
    u, v = f16(U), f16(V)
    d = f16(f16(f16(f16(u * u).sum(1, keepdim=True)) - f16(2 * f16(u @ v.T))) + f16(f16(v * v).sum(1))).clamp(min=0)
    if not torch.isfinite(d).all():
        d = ((U * U).sum(1, keepdim=True) - 2 * U @ V.T + (V * V).sum(1)).clamp(min=0)
    return d


def manifold_radii(features, k=3, block=10000):
    """ADM's ManifoldEstimator.manifold_radii: each row's squared distance to its k-th nearest neighbour other
    than itself, i.e. the (k+1)-th smallest in its row of distances. features (N, D) tensor -> (N,)."""
    radii = []
    for i in range(0, len(features), block):
        near = []  # the k + 1 nearest of each column block: a block's worth of memory, not a row of N
        for j in range(0, len(features), block):
            d = pairwise_distances(features[i: i + block], features[j: j + block])  # (block, block)
            near.append(d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values)
        radii.append(torch.cat(near, dim=1).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(ref_pool, sample_pool, k=3, block=10000, device="cpu"):
    """ADM's compute_prec_recall (ManifoldEstimator.evaluate_pr; Kynkaanniemi et al. 2019): precision is the
    fraction of samples within the k-NN radius of some reference image, recall the fraction of reference
    images within the k-NN radius of some sample. Distances in blocks of `block` x `block` as ADM, so the
    float16/float32 choice of each block is ADM's too."""
    ref = torch.as_tensor(np.asarray(ref_pool, dtype=np.float32), device=device)
    smp = torch.as_tensor(np.asarray(sample_pool, dtype=np.float32), device=device)
    r_ref, r_smp = manifold_radii(ref, k, block), manifold_radii(smp, k, block)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    for i in range(0, len(ref), block):
        for j in range(0, len(smp), block):
            d = pairwise_distances(ref[i: i + block], smp[j: j + block])  # (refs, samples)
            smp_in[j: j + block] |= (d <= r_ref[i: i + block, None]).any(dim=0)
            ref_in[i: i + block] |= (d <= r_smp[None, j: j + block]).any(dim=1)
    return smp_in.double().mean().item(), ref_in.double().mean().item()


# -----------------------------------------------------------------------------------------------
# .npz files and reference batches

INCEPTION_STATS = {"mu": 2048, "sigma": 2048, "mu_s": 2023, "sigma_s": 2023}  # ADM's names -> feature size
# (pool_3, spatial)


def open_images(path):
    """`arr_0` of an .npz, uint8 (N, H, W, 3), without reading it into memory: np.savez stores its arrays
    uncompressed, so arr_0 is memory-mapped where it lies in the zip (a compressed one is read whole)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("arr_0.npy")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                header_len = f.tell()
        if info.compress_type == zipfile.ZIP_STORED and not fortran:
            with open(path, "rb") as f:  # the data start after the zip's local header (30 bytes, name, extra field)
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
            offset = info.header_offset + 30 + name_len + extra_len + header_len
            images = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        else:
            images = np.load(path)["arr_0"]
    except KeyError:
        raise ValueError(f"{path} has no arr_0: expected an ADM-style .npz with the images in arr_0 "
                         f"(sample.py --npz writes one)") from None
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 is {images.dtype} {images.shape}, expected uint8 images (N, H, W, 3)")
    return images


def check_count(n, path):
    if n < 4:
        raise ValueError(f"{path} has {n} images: the metrics need at least 4 (precision/recall use 3 neighbours)")


def read_stats(path, sizes, what):
    """The stored statistics of an .npz named in `sizes` (name -> feature size D), as ADM's read_statistics
    reads them, or None when it has none of them. Checked before any feature is computed: all of them or none,
    mu (D,) and sigma (D, D) for the features of `what`, finite."""
    with np.load(path) as f:
        have = [k for k in sizes if k in f.files]
        if have and len(have) < len(sizes):
            raise ValueError(f"{path} has {', '.join(have)} but not {', '.join(k for k in sizes if k not in have)}: "
                             f"a reference batch holds all of {', '.join(sizes)} or none (remake it with --make-ref)")
        stats = [f[k] for k in sizes] if have else None
    for (k, D), a in zip(sizes.items(), stats or []):
        shape = (D, D) if k.startswith("sigma") else (D,)
        if a.shape != shape:
            raise ValueError(f"{path}: {k} is {a.shape}, but the {D}-d features of {what} need {shape}; remake "
                             f"the reference batch with --make-ref")
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: {k} is not finite (NaN or inf); remake the reference batch with --make-ref")
    return stats


def check_features(features, path, what, n=None):
    """A clear error instead of a NaN metric: finite features, not all the same. `features`: a row per image, or
    (for n images) two rows that hold each feature's minimum and maximum."""
    if not np.isfinite(features).all():
        raise ValueError(f"{what} features of {path} are not finite (NaN or inf): are the weights right?")
    if np.ptp(features, axis=0).max() == 0:
        raise ValueError(f"all {len(features) if n is None else n} images of {path} give the same {what} features "
                         f"(identical images?): a covariance needs varied images")


def evaluate(ref_path, sample_path, inception, dino=None, batch_size=64, device="cpu"):
    """ADM's main(): the metrics of the samples against the reference batch, in ADM's order, then FD_DINOv2
    with `dino`. -> dict of floats. The inputs are checked before any feature is computed."""
    ref_images, sample_images = open_images(ref_path), open_images(sample_path)
    if ref_images.shape[1:] != sample_images.shape[1:]:
        raise ValueError(f"{sample_path} holds {sample_images.shape[1]}x{sample_images.shape[2]} images, the reference "
                         f"{ref_path} {ref_images.shape[1]}x{ref_images.shape[2]}: compare samples at the "
                         f"reference's resolution")
    check_count(len(ref_images), ref_path)
    check_count(len(sample_images), sample_path)
    stored = {name: read_stats(path, INCEPTION_STATS, "Inception") for name, path in
              (("reference", ref_path), ("sample", sample_path))}
    ref_dino = None
    if dino is not None:
        sizes = {"mu_dinov2": dino.embed_dim, "sigma_dinov2": dino.embed_dim}
        ref_dino = read_stats(ref_path, sizes, "the --dino network")
    if len(sample_images) < 5000:
        print(f"note: {sample_path} has {len(sample_images)} images, fewer than one Inception Score split (5000): "
              f"the IS is over all of them, not comparable with 50K results", file=sys.stderr)
    acts, stats = {}, {}
    for name, path, images in (("reference", ref_path, ref_images), ("sample", sample_path, sample_images)):
        print(f"computing {name} batch activations...")
        acts[name] = inception_features(inception, images, batch_size)
        check_features(acts[name][0], path, "Inception")
        s = stored[name]
        stats[name] = ((s[0], s[1]), (s[2], s[3])) if s else \
            (feature_statistics(acts[name][0]), feature_statistics(acts[name][1]))
    print("computing evaluations...")
    prec, rec = precision_recall(acts["reference"][0], acts["sample"][0], device=device)
    results = {"Inception Score": inception_score(acts["sample"][2]),
               "FID": frechet_distance(*stats["sample"][0], *stats["reference"][0]),
               "sFID": frechet_distance(*stats["sample"][1], *stats["reference"][1]),
               "Precision": prec, "Recall": rec}
    if dino is not None:
        if ref_dino is None:
            ref_feats = dino_features(dino, ref_images, batch_size)
            check_features(ref_feats, ref_path, "DINOv2")
            ref_dino = feature_statistics(ref_feats)
        sample_feats = dino_features(dino, sample_images, batch_size)
        check_features(sample_feats, sample_path, "DINOv2")
        results["FD_DINOv2"] = frechet_distance(*feature_statistics(sample_feats), *ref_dino)
    return results


class FolderImages:
    """The images under a folder (any depth, sorted paths), centre-cropped to `resolution` when sliced:
    an array-like uint8 (N, R, R, 3) that reads files only as they are needed."""

    EXTS = (".jpeg", ".jpg", ".png", ".webp", ".bmp")

    def __init__(self, root, resolution):
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root, followlinks=True) for f in fs
                            if f.lower().endswith(self.EXTS) and not f.startswith("."))
        self.resolution = resolution
        if not self.files:
            raise ValueError(f"--make-ref {root}: no images ({', '.join(self.EXTS)}) in the folder")

    def __len__(self):
        return len(self.files)

    @property
    def shape(self):
        return len(self.files), self.resolution, self.resolution, 3

    def __getitem__(self, index):
        files = self.files[index] if isinstance(index, slice) else [self.files[i] for i in index]
        out = []
        for f in files:
            try:
                with Image.open(f) as im:
                    out.append(center_crop_arr(im.convert("RGB"), self.resolution))
            except OSError as e:
                raise ValueError(f"--make-ref: cannot read {f} ({e}); remove it or fix it") from None
        return np.stack(out)


def open_source(source, resolution=None):
    """A --make-ref source -> (uint8 images (N, R, R, 3), array-like, and the rows to use): a dataset of
    prepare_latents.py made with --images (its valid rows), an .npz with arr_0, or an image folder (the ADM
    centre crop to `resolution`, 256 by default). Checked before any feature is computed: a dataset must be
    finished and hold images, `resolution` applies to a folder only, and at least 4 images."""
    if os.path.isdir(source) and any(os.path.exists(os.path.join(source, f)) for f in OUTPUT_FILES):
        if not os.path.isfile(os.path.join(source, "meta.json")):
            raise ValueError(f"--make-ref {source}: a prepare_latents.py dataset without meta.json, so unfinished "
                             f"(the rows not yet encoded are empty); rerun its prepare_latents.py command to finish it")
        with open(os.path.join(source, "meta.json")) as f:
            if not json.load(f).get("has_images"):
                raise ValueError(f"--make-ref {source}: this prepare_latents.py dataset has no images (made without "
                                 f"--images); make one with prepare_latents.py --images, or give the image folder")
        images = np.load(os.path.join(source, "images.npy"), mmap_mode="r")
        rows = np.flatnonzero(np.load(os.path.join(source, "valid.npy")))  # an unreadable file left a zero row
    elif os.path.isdir(source):
        images = FolderImages(source, resolution or 256)
        rows = np.arange(len(images))
    elif source.endswith(".npz"):
        images = open_images(source)
        rows = np.arange(len(images))
    else:
        raise ValueError(f"--make-ref {source}: expected an image folder, a prepare_latents.py dataset made "
                         f"with --images, or an .npz with arr_0")
    if resolution is not None and images.shape[1:3] != (resolution, resolution):
        raise ValueError(f"--resolution {resolution}: {source} holds {images.shape[1]}x{images.shape[2]} images, "
                         f"which are used as they are (--resolution crops an image folder); leave it out")
    check_count(len(rows), source)
    return images, rows


def make_ref(source, out, inception, dino=None, resolution=None, num_images=10000, seed=0, batch_size=64):
    """A reference batch in ADM's layout for your own data: statistics over all images of `source` (mu, sigma,
    mu_s, sigma_s; mu_dinov2, sigma_dinov2 with `dino`; float64) and arr_0, a seeded subset of `num_images` of
    them in their order (precision/recall use it). `source`: see open_source. One pass over the source, each
    image read once: the statistics are running sums (StreamingStatistics) and only the arr_0 rows are kept, so
    the memory does not grow with the number of images."""
    images, rows = open_source(source, resolution)
    keep = rows[np.sort(np.random.default_rng(seed).choice(len(rows), min(num_images, len(rows)), replace=False))]
    arr_0 = np.empty((len(keep), *images.shape[1:]), np.uint8)
    stats = {"": StreamingStatistics(), "_s": StreamingStatistics()}
    if dino is not None:
        stats["_dinov2"] = StreamingStatistics()
    for start, batch in batches(images, batch_size, "reference: Inception" + (", DINOv2" if dino is not None else "")):
        (r0, r1), (k0, k1) = (np.searchsorted(a, [start, start + len(batch)]) for a in (rows, keep))
        sel = rows[r0:r1] - start  # the batch's rows to use (both sorted lists)
        arr_0[k0:k1] = batch[keep[k0:k1] - start]  # and those to keep
        pool, spatial, _ = inception_batch(inception, batch)
        stats[""].update(pool[sel])
        stats["_s"].update(spatial[sel])
        if dino is not None:
            stats["_dinov2"].update(dino_batch(dino, batch)[sel])
    arrays = {}
    for key, acc in stats.items():
        arrays["mu" + key], arrays["sigma" + key] = acc.result()
        what = "DINOv2" if key == "_dinov2" else "Inception"
        check_features(np.stack([acc.lo, acc.hi]), source, what, acc.n)
    arrays["arr_0"] = arr_0
    with plumbing.atomic_write(out) as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
    return arrays


# -----------------------------------------------------------------------------------------------
# the validation loss: train.py's cheap yardstick between FID runs, the flow-matching loss on held-out images,
# deterministic (--val-data, --eval-only). The time grid: the midpoint
# quantiles (k + 0.5) / 8 of training's t = sigmoid(randn), so that each time stands for an eighth of the
# training distribution: 0.177 0.292 0.380 0.461 0.539 0.620 0.708 0.823.
VAL_TIMES = tuple(1 / (1 + math.exp(-NormalDist().inv_cdf((k + 0.5) / 8))) for k in range(8))
VAL_CHUNK = 64  # images per forward pass, part of the definition: CPU matmuls round differently at other sizes
VAL_MUST_MATCH = ("latent_shape", "num_classes", "class_names", "vae", "scaling_factor")  # of train and val sets


class ValSet:
    """The held-out set of --val-data: its valid images in a fixed seeded order (the same for every run), the
    first `size` of them (all by default). It must be encoded like the training set `train_meta` (of `train_dir`)."""

    def __init__(self, val_dir, size, train_meta, train_dir):
        meta = read_meta(val_dir, "--val-data")
        diff = [f"{k} {train_meta.get(k)!r} vs {meta.get(k)!r}" for k in VAL_MUST_MATCH
                if train_meta.get(k) != meta.get(k)]
        if diff:
            plumbing.refuse(f"--val-data {val_dir} does not match --data {train_dir}: {'; '.join(diff)}. Make the "
                            f"val set with prepare_latents.py from held-out images of the same classes, with the "
                            f"same --vae and --resolution")
        valid = np.flatnonzero(np.load(os.path.join(val_dir, "valid.npy")))
        order = np.random.default_rng(0).permutation(valid)  # seed 0, not --seed: every run scores the same images
        size = len(order) if size is None else size
        if not len(VAL_TIMES) <= size <= len(order):
            plumbing.refuse(f"--val-size {size}: must be between {len(VAL_TIMES)} (one image per time of the grid) "
                            f"and the {len(order)} valid images of --val-data {val_dir}")
        self.rows = order[:size]
        self.latents = np.load(os.path.join(val_dir, "latents.npy"), mmap_mode="r")  # (N, 2, C, h, w)
        self.labels = np.load(os.path.join(val_dir, "labels.npy"))
        self.scale = meta["scaling_factor"]


@torch.no_grad()
def val_loss(model, val, device, precision="fp32"):
    """The validation loss of `model` (a DDT or improved DiT) on `val` (a ValSet): {"loss": the mean over the
    times of VAL_TIMES of the per-time means, "loss_t": the per-time means}, as Python floats.

    Image j of the val order is taken at time t = VAL_TIMES[j % 8] (each time gets an eighth of the images),
    with its true class (no dropout), its posterior sample x = (mean + std * eps) * scale and its noise drawn
    from a generator seeded by (its row in the dataset, the time's index); the loss is training's
    |v(t x + (1 - t) noise, t, y) - (x - noise)|^2, mean over the latent, without the REPA term. The forward
    passes take fixed chunks of VAL_CHUNK images, chunk c on rank c % world, and one all-reduce collects
    the per-image losses (float64): the same number for any world size, whatever batch size the run trains
    with, bit-exact on the CPU. Under torchrun a collective: every rank calls it."""
    rank, world = plumbing.rank_world()
    T, n = len(VAL_TIMES), len(val.rows)
    losses = torch.zeros(n, dtype=torch.float64, device=device)
    for a in range(rank * VAL_CHUNK, n, world * VAL_CHUNK):
        j = np.arange(a, min(a + VAL_CHUNK, n))  # positions in the val order
        rows, k = val.rows[j], j % T
        lat = torch.from_numpy(val.latents[rows].astype(np.float32))  # (b, 2, C, h, w)
        gens = [torch.Generator().manual_seed(plumbing.mix_seed(int(r), int(i))) for r, i in zip(rows, k)]
        eps = torch.stack([torch.randn(lat.shape[2:], generator=g) for g in gens])  # each generator: eps first,
        noise = torch.stack([torch.randn(lat.shape[2:], generator=g) for g in gens])  # then the noise
        x = ((lat[:, 0] + lat[:, 1] * eps) * val.scale).to(device)  # (b, C, h, w) posterior sample
        noise = noise.to(device)
        t = torch.tensor([VAL_TIMES[i] for i in k], dtype=torch.float32, device=device)[:, None, None, None]
        with plumbing.autocast(device, precision):
            v = model(t * x + (1 - t) * noise, t.flatten(), torch.from_numpy(val.labels[rows]).to(device)).v
        losses[torch.from_numpy(j).to(device)] = (v.float() - (x - noise)).pow(2).flatten(1).mean(1).double()
    if world > 1:
        dist.all_reduce(losses)  # every position is filled by one rank, zero elsewhere: an exact sum
    losses = losses.cpu()
    per_t = [losses[i::T].mean().item() for i in range(T)]
    return {"loss": sum(per_t) / T, "loss_t": per_t}


def checkpoint_val_loss(path, val, device, precision):
    """train.py --eval-only: the validation record (val_record) of a project checkpoint's raw and EMA weights,
    printed by rank 0 and returned; writes nothing."""
    try:
        ckpt = plumbing.load_checkpoint(path)
        raw_model, ema = (pretrained.load_ddt(path, ema=e, ckpt=ckpt).to(device) for e in (False, True))
    except (OSError, ValueError) as e:  # plumbing.CheckpointError is a ValueError
        raise SystemExit(f"--eval-only: {e}") from None
    rec = val_record(ckpt["step"], raw_model, ema, val, device, precision)
    if plumbing.rank_world()[0] == 0:
        print(plumbing.format_record(rec), flush=True)
    return rec


def val_record(step, raw_model, ema, val, device, precision):
    """The log record of a validation: the raw and the EMA model's loss, their per-time means, the set's size."""
    t0 = time.time()
    raw_l, ema_l = (val_loss(m, val, device, precision) for m in (raw_model, ema))
    return {"step": step, "val_loss": raw_l["loss"], "val_loss_ema": ema_l["loss"], "val_size": len(val.rows),
            "val_seconds": time.time() - t0, "val_loss_t": raw_l["loss_t"], "val_loss_ema_t": ema_l["loss_t"]}


# -----------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = plumbing.ArgumentParser("FID, sFID, IS, precision, recall (the ADM evaluator) and FD_DINOv2.")
    p.add_argument("ref", nargs="?", help="reference batch .npz (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("samples", nargs="?", help="samples .npz (arr_0 uint8 (N, H, W, 3), e.g. from sample.py --npz)")
    p.add_argument("--inception", required=True, help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                                                      "or pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--dino", help="dinov2_vitl14_pretrain.pth: also compute FD_DINOv2")
    p.add_argument("--batch-size", type=plumbing.number(int, 1), default=64, help="images per network call")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.add_argument("--make-ref", metavar="SOURCE", help="make a reference batch instead: an image folder, a "
                                                         "prepare_latents.py dataset with --images, or an .npz")
    p.add_argument("--out", help="the reference batch --make-ref writes")
    p.add_argument("--resolution", type=plumbing.number(int, 1), help="--make-ref from a folder: centre-crop size "
                                                                      "(default 256)")
    p.add_argument("--num-images", type=plumbing.number(int, 4), default=10000,
                   help="--make-ref: images kept in arr_0 (at least 4: precision/recall use 3 neighbours)")
    p.add_argument("--seed", type=plumbing.number(int, 0), default=0, help="--make-ref: seed of the arr_0 subset")
    args = p.parse_args(argv)
    if args.make_ref:
        if args.ref or args.samples or not args.out:
            p.error("--make-ref SOURCE takes --out REF.npz and no positional files")
    elif not (args.ref and args.samples):
        p.error("give REF.npz and SAMPLES.npz (or --make-ref SOURCE --out REF.npz)")
    if args.out and not args.make_ref:
        p.error("--out goes with --make-ref")
    if args.resolution is not None and not args.make_ref:
        p.error("--resolution goes with --make-ref")
    return args


def main(argv=None):
    args = parse_args(argv)
    plumbing.check_writable(("--out", args.out), ("--json", args.json))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lock = None
    try:
        if args.make_ref:  # one run per --out
            lock = plumbing.lock_file(args.out + ".lock", "--out", args.out, "evaluate.py --make-ref")
            if lock is not None:  # the lock is ours: a REF.npz.tmpPID there is a killed run's
                plumbing.remove_stale_tmp(glob.escape(args.out))
        inception = load_inception(args.inception).to(device)
        dino = pretrained.load_dino(args.dino, pos_rule="hub").to(device) if args.dino else None
        if dino is not None and (dino.embed_dim, len(dino.blocks)) != (1024, 24):
            print(f"warning: --dino {args.dino} is a ViT/14 of width {dino.embed_dim} and depth {len(dino.blocks)}, "
                  f"not the ViT-L/14 (1024, 24) that FD_DINOv2 is defined on: its numbers are not comparable with "
                  f"published ones", file=sys.stderr)
        if args.make_ref:
            arrays = make_ref(args.make_ref, args.out, inception, dino, args.resolution, args.num_images, args.seed,
                              args.batch_size)
            stats = ", ".join(k for k in arrays if k != "arr_0")
            print(f"wrote {args.out}: arr_0 {arrays['arr_0'].shape}, statistics {stats}")
            return
        results = evaluate(args.ref, args.samples, inception, dino, args.batch_size, device)
    except (OSError, ValueError, NotImplementedError) as e:  # bad files: a message, not a traceback
        raise SystemExit(f"error: {e}") from None
    finally:
        if lock is not None:
            plumbing.unlock(lock, remove=True)
    for name, value in results.items():
        print(f"{name}: {value}")
    if args.json:
        with plumbing.atomic_write(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
