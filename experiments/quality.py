"""
Sample quality at the scale of the built-in data sets, measured the way FID measures it, with a small classifier
trained on the real training split in place of InceptionV3:

- class agreement: the share of samples that the classifier reads as the class they were drawn for;
- a Fréchet distance (evaluate.frechet_distance, the ADM evaluator's) between the classifier's features of the
  samples and of the held-out images (its pooled last convolution, as FID uses Inception's pool_3).

The miniature study (study.py) and the sharing frontier (samplers.py --quality) use this one module. The classifier
is trained once per data set, seeded, and kept in a file (Scorer). Everything is in the model's space: the
dataset's posterior means times its scaling factor, what sample.sample_loop returns.
"""

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
import plumbing
import sample


class Classifier(nn.Module):
    """Three 3x3 convolutions (the last two with stride 2), global average pooling to `features` numbers, a linear
    layer to the class logits."""

    def __init__(self, in_channels, num_classes, width=32, features=64):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, features, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(features, num_classes)

    def forward(self, x):
        f = self.body(x)  # (B, features)
        return self.head(f), f


def read_images(data_dir):
    """(x (n, C, H, W) float32 in the model's space, y (n,) int64) of a prepare_latents.py dataset's valid rows."""
    with open(os.path.join(data_dir, "meta.json")) as f:
        scale = json.load(f)["scaling_factor"]
    valid = np.load(os.path.join(data_dir, "valid.npy"))
    x = np.load(os.path.join(data_dir, "latents.npy"), mmap_mode="r")[valid][:, 0].astype(np.float32) * scale
    return torch.from_numpy(x), torch.from_numpy(np.load(os.path.join(data_dir, "labels.npy"))[valid]).long()


def train_classifier(x, y, num_classes, steps=2000, batch=128, lr=1e-3, seed=0):
    """The classifier trained on (x, y) with Adam, each batch shifted by up to H/16 pixels (a random crop of the
    edge-padded images), seeded: the same weights for the same data, machine and thread count."""
    torch.manual_seed(seed)
    clf = Classifier(x.shape[1], num_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    gen, pad, H, W = torch.Generator().manual_seed(seed), max(1, x.shape[2] // 16), x.shape[2], x.shape[3]
    padded = F.pad(x, (pad,) * 4, mode="replicate")
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        dy, dx = torch.randint(2 * pad + 1, (2,), generator=gen).tolist()
        loss = F.cross_entropy(clf(padded[idx, :, dy:dy + H, dx:dx + W])[0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval().requires_grad_(False)


@torch.no_grad()
def logits_and_features(clf, x, batch=500):
    """(logits (n, K), features (n, F)) float32 numpy of images x, in batches."""
    out = [clf(x[s:s + batch].float().cpu()) for s in range(0, len(x), batch)]
    return torch.cat([o[0] for o in out]).numpy(), torch.cat([o[1] for o in out]).numpy()


def score(clf, x, y, ref):
    """{"agreement": % of images x the classifier reads as class y, "fd": the Fréchet distance of their features
    to `ref` (mu, sigma)}."""
    logits, feats = logits_and_features(clf, x)
    agreement = float((logits.argmax(1) == np.asarray(y)).mean() * 100)
    return {"agreement": agreement, "fd": evaluate.frechet_distance(*evaluate.feature_statistics(feats), *ref)}


class Scorer:
    """The quality measure of one data set: the classifier in `path`, or one trained on train_dir's images and
    written there (with the data sets' paths, so that a classifier of other data is refused), and the statistics
    of its features on val_dir's held-out images. `floor` is the score of real images, 1,000 training images (a
    seeded choice) against the held-out ones, what real data scores at about the samples' size, with the
    classifier's accuracy on the held-out images (`val_accuracy`)."""

    def __init__(self, path, train_dir, val_dir, seed=0):
        xv, yv = read_images(val_dir)
        xt, yt = read_images(train_dir)
        num_classes = int(max(yt.max(), yv.max())) + 1
        data = {"train": os.path.abspath(train_dir), "val": os.path.abspath(val_dir), "seed": seed}
        if os.path.exists(path):
            ckpt = plumbing.load_checkpoint(path)
            if ckpt.get("data") != data:
                raise SystemExit(f"{path} is a classifier of {ckpt.get('data')}, not of {data}: delete it or pass "
                                 f"another --classifier")
            self.clf = Classifier(xt.shape[1], num_classes)
            self.clf.load_state_dict(ckpt["state_dict"])
            self.clf.eval().requires_grad_(False)
        else:
            self.clf = train_classifier(xt, yt, num_classes, seed=seed)
            plumbing.save_atomic({"state_dict": self.clf.state_dict(), "data": data}, path)
        self.ref = evaluate.feature_statistics(logits_and_features(self.clf, xv)[1])
        pick = np.random.default_rng(seed).permutation(len(xt))[:1000]
        self.floor = self.score(xt[pick], yt[pick]) | {"val_accuracy": self.score(xv, yv)["agreement"]}

    def score(self, x, y):
        return score(self.clf, x, y, self.ref)


def draw(model, shape, num_samples, sampler, encoder_steps=None, seed=0, batch=250, watch=None):
    """(samples (n, *shape) float32, labels (n,)): `num_samples` images, the classes in turn (balanced), the noise
    of sample i from (seed, i) (sample.image_noise), so every model and setting gets the same noise."""
    y = torch.arange(num_samples) % model.cfg.num_classes
    out = []
    for s in range(0, num_samples, batch):
        noise = sample.image_noise(seed, range(s, min(s + batch, num_samples)), shape)[0]
        out.append(sample.sample_loop(model, noise, y[s:s + batch], sampler, encoder_steps, watch=watch).float())
    return torch.cat(out), y
