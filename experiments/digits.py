"""
The built-in handwritten digits: scikit-learn's 1,797 8x8 digits, upsampled, written as PNG folders and encoded
in pixel space by prepare_latents.py, with a seeded train/val split of 1,497 / 300, at 32x32 (data/digits,
data/digits_val) and 16x16 (data/digits16, data/digits16_val: the miniature study's). scikit-learn only reads
them; it is not a dependency of nanoDDT:

    pip install --target /tmp/sklearn scikit-learn
    PYTHONPATH=/tmp/sklearn python -m experiments.digits
"""

import os

import numpy as np
from PIL import Image

import prepare_latents


def main():
    from sklearn.datasets import load_digits
    d = load_digits()  # 1,797 8x8 images, values 0..16
    val = set(np.random.default_rng(0).permutation(len(d.images))[:300].tolist())  # seeded: 1,497 train, 300 val
    for size, name in ((32, "digits"), (16, "digits16")):
        for i, (img, y) in enumerate(zip(d.images, d.target)):
            folder = f"data/{name}_{'val' if i in val else 'train'}_png/{y}"
            os.makedirs(folder, exist_ok=True)
            a = np.rint(img * (255 / 16)).astype(np.uint8)
            Image.fromarray(a).resize((size, size), Image.BILINEAR).convert("RGB").save(f"{folder}/{i:04d}.png")
        for split, out in (("train", name), ("val", f"{name}_val")):
            prepare_latents.main(["--data-path", f"data/{name}_{split}_png", "--vae", "none", "--resolution",
                                  str(size), "--num-workers", "0", "--out", f"data/{out}"])


if __name__ == "__main__":
    main()
