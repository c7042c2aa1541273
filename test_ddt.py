"""nanoDDT tests: golden parity with the released code, and the behaviour of every script. CPU, a few minutes.

    python -m pytest -q test_ddt.py
"""

import argparse
import copy
import itertools
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFont

import bench
import ddt
import evaluate
import plumbing
import prepare_latents
import pretrained
import sample
import train
from experiments import quality, samplers, study
from experiments.ranks import max_rel_diff
from ddt import DDT, PRESETS, DDTConfig
from plumbing import CheckpointError
from pretrained import load_ddt
from pretrained import AutoencoderKL, DINOv2, load_dino, load_vae, read_safetensors
from prepare_latents import center_crop_arr, list_images, make_toy_images

HERE = os.path.dirname(os.path.abspath(__file__))
# torch.compile imports torch/utils/mkldnn.py (through inductor's fx passes), whose classes still use the deprecated
# torch.jit.script_method: torch's own warning, 14 times a run, about nothing this project calls
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
TESTDATA = os.path.join(HERE, "testdata")
TINY = DDTConfig(in_channels=4, patch_size=2, hidden_size=32, num_heads=2, encoder_depth=4, decoder_depth=2,
                 num_classes=10)  # the config of testdata/ddt_official_tiny.ckpt


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def run_script(*args, env=None, check=True, timeout=600):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **(env or {})}
    r = subprocess.run([sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


# =============================================================================================
# ddt.py: the DDT model


@pytest.fixture(scope="module")
def golden_ddt():
    return torch.load(os.path.join(TESTDATA, "ddt_official_tiny_io.pt"), weights_only=True)


@pytest.fixture(scope="module")
def tiny_ddt():
    return load_ddt(os.path.join(TESTDATA, "ddt_official_tiny.ckpt"), TINY)


@pytest.mark.parametrize("case", [0, 1], ids=["square", "non-square"])
def test_ddt_golden_parity(tiny_ddt, golden_ddt, case):
    g = golden_ddt["cases"][case]
    with torch.no_grad():
        v, z, _ = tiny_ddt(g["x"], g["t"], g["y"])
        v2, z2, _ = tiny_ddt(g["x2"], g["t2"], g["y"], z=z)  # second call reuses z
    assert rel_err(v, g["v"]) < 1e-5 and rel_err(z, g["z"]) < 1e-5 and rel_err(v2, g["v2"]) < 1e-5
    assert z2 is z


def test_ddt_ema_chosen_over_raw(golden_ddt):
    raw = load_ddt(os.path.join(TESTDATA, "ddt_official_tiny.ckpt"), TINY, ema=False)
    g = golden_ddt["cases"][0]
    with torch.no_grad():
        v, _, _ = raw(g["x"], g["t"], g["y"])
    assert rel_err(v, g["v"]) > 1e-3  # the golden outputs are the EMA weights'


def test_ddt_z_reuse_equals_recomputation(tiny_ddt):
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 4, 8, 12), torch.rand(3), torch.tensor([0, 4, 10])
    with torch.no_grad():
        v, z, h0 = tiny_ddt(x, t, y)
        c = F.silu(tiny_ddt.t_embedder(t)[:, None] + tiny_ddt.y_embedder(y)[:, None])
        s, _ = tiny_ddt.encode(x, c)
        assert h0 is None and torch.equal(z, F.silu(tiny_ddt.t_embedder(t)[:, None] + s))
        assert torch.equal(v, tiny_ddt.decode(x, z))
        assert torch.equal(tiny_ddt(x, t, y, z=z).v, v)
        v3, z3, h = tiny_ddt(x, t, y, repa_layer=2)
    assert torch.equal(v3, v) and torch.equal(z3, z) and h.shape == (3, 24, 32)


def test_ddt_repa_feature_is_block_output(tiny_ddt):
    torch.manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        _, _, h = tiny_ddt(x, t, y, repa_layer=3)
        c = F.silu(tiny_ddt.t_embedder(t)[:, None] + tiny_ddt.y_embedder.embedding_table(y)[:, None])
        s = tiny_ddt.s_embedder.proj(ddt.patchify(x, 2))
        for block in tiny_ddt.blocks[:3]:
            s = block(s, c, ddt.rope_2d(16, 4, 4, x.device))
    assert torch.allclose(h, s, atol=1e-6)


def test_ddt_rope_is_not_state(tiny_ddt):
    assert tiny_ddt.rope_tables(torch.zeros(1, 4, 8, 12))[0].shape == (24, 8)
    assert not any("rope" in k for k in tiny_ddt.state_dict())


def test_rope_is_the_released_complex_rotation():
    x = torch.randn(2, 3, 24, 16)
    cos, sin = ddt.rope_2d(16, 4, 6, "cpu")
    def released(x, cos, sin):  # apply_rotary_emb: in complex float32, back to x's dtype
        out = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * torch.complex(cos, sin)
        return torch.view_as_real(out).flatten(-2).type_as(x)
    assert torch.allclose(ddt.apply_rope(x, cos, sin), released(x, cos, sin), atol=1e-6)
    xb = x.bfloat16()  # a bf16 model: rotated in float32 as released, not in bf16
    assert ddt.apply_rope(xb, cos, sin).dtype == torch.bfloat16
    assert torch.equal(ddt.apply_rope(xb, cos, sin), released(xb, cos, sin))
    exact = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) *
                               torch.complex(cos.double(), sin.double())).flatten(-2)
    assert torch.allclose(ddt.apply_rope(x, cos, sin).double(), exact, atol=1e-6)
    assert torch.allclose(exact.norm(dim=-1), x.double().norm(dim=-1), atol=1e-9)  # a rotation


def test_ddt_bf16_autocast_close(tiny_ddt, golden_ddt):
    g = golden_ddt["cases"][1]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        v, z, _ = tiny_ddt(g["x"], g["t"], g["y"])
    assert torch.isfinite(v).all() and rel_err(v, g["v"]) < 5e-2 and rel_err(z, g["z"]) < 5e-2


def test_preset_parameter_counts():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in DDT(cfg).parameters()) for name, cfg in PRESETS.items()}
    assert counts["DDT-XL/2"] == 674_646_352  # the released model
    assert (PRESETS["DDT-XL/2"].encoder_depth, PRESETS["DDT-XL/2"].decoder_depth) == (22, 6)
    assert counts["DDT-S/2"] < counts["DDT-B/2"] < counts["DDT-L/2"] < counts["DDT-XL/2"]


def test_patchify_round_trip_and_unfold_order():
    x = torch.randn(2, 3, 8, 12)
    p = ddt.patchify(x, 2)
    assert torch.equal(p, F.unfold(x, 2, stride=2).transpose(1, 2))  # the released token/feature order
    assert torch.equal(ddt.unpatchify(p, 2, 8, 12), x)


def test_init_as_released():
    m = DDT(TINY)
    assert m.final_layer.linear.weight.abs().sum() == 0 and m.final_layer.adaLN_modulation[0].weight.abs().sum() == 0
    assert m.blocks[0].adaLN_modulation[0].weight.abs().sum() > 0  # not adaLN-zero
    with torch.no_grad():
        v, _, _ = m(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([3]))
    assert torch.equal(v, torch.zeros_like(v))


def test_load_ddt_wrong_preset_says_what_fits():
    with pytest.raises(CheckpointError) as e:
        load_ddt(os.path.join(TESTDATA, "ddt_official_tiny.ckpt"), "DDT-S/2")
    msg = str(e.value)
    assert "shape mismatch" in msg and "hidden size 32" in msg and "6 blocks" in msg and "= 16" in msg and "split" in msg
    with pytest.raises(CheckpointError, match="unexpected"):  # right width, one block too few
        load_ddt(os.path.join(TESTDATA, "ddt_official_tiny.ckpt"), DDTConfig(**{**TINY.__dict__, "decoder_depth": 1}))
    with pytest.raises(CheckpointError, match="--model"):  # released checkpoint without a config
        load_ddt(os.path.join(TESTDATA, "ddt_official_tiny.ckpt"))


def test_load_ddt_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_ddt(str(tmp_path / "nope.ckpt"), TINY)
    data = open(os.path.join(TESTDATA, "ddt_official_tiny.ckpt"), "rb").read()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    for bad in ("cut.ckpt", "junk.ckpt"):
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_ddt(str(tmp_path / bad), TINY)
    ckpt = torch.load(os.path.join(TESTDATA, "ddt_official_tiny.ckpt"), weights_only=True)
    ckpt["hyper_parameters"] = {"when": __import__("datetime").date(2025, 4, 1)}  # a pickled Python object
    torch.save(ckpt, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="allow-pickle"):
        load_ddt(str(tmp_path / "pickled.ckpt"), TINY)
    assert isinstance(load_ddt(str(tmp_path / "pickled.ckpt"), TINY, allow_pickle=True), DDT)


# =============================================================================================
# ddt.py: SD-VAE and safetensors


DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path, tensors, metadata=None):
    """Minimal writer by hand (the format spec), independent of the reader under test."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # pad to 8 bytes like the reference writer
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.fixture(scope="module")
def golden_vae():
    return torch.load(os.path.join(TESTDATA, "vae_tiny_io.pt"), weights_only=True)


@pytest.mark.parametrize("which", ["dir", "oldkeys"])
def test_vae_golden(golden_vae, which):
    if which == "dir":
        vae = load_vae(os.path.join(TESTDATA, "vae_tiny"))
    else:
        with open(os.path.join(TESTDATA, "vae_tiny", "config.json")) as f:
            vae = load_vae(os.path.join(TESTDATA, "vae_tiny_oldkeys.safetensors"), config=json.load(f))
    assert not vae.training and all(p.dtype == torch.float32 and not p.requires_grad for p in vae.parameters())
    with torch.no_grad():
        mean, logvar = vae.encode(golden_vae["images_pm1"])
        img = vae.decode(golden_vae["posterior_mean"])
    assert mean.shape == golden_vae["posterior_mean"].shape
    assert rel_err(mean, golden_vae["posterior_mean"]) < 1e-5
    assert rel_err(logvar, golden_vae["posterior_logvar"]) < 1e-5
    assert rel_err(img, golden_vae["decoded_from_mean"]) < 1e-5


def test_vae_bf16_autocast(golden_vae):
    vae = load_vae(os.path.join(TESTDATA, "vae_tiny"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mean, logvar = vae.encode(golden_vae["images_pm1"])
        img = vae.decode(golden_vae["posterior_mean"])
    for out, ref in [(mean, "posterior_mean"), (logvar, "posterior_logvar"), (img, "decoded_from_mean")]:
        assert torch.isfinite(out).all()
        assert rel_err(out.float(), golden_vae[ref]) < 0.1  # measured ~0.025


def test_vae_default_is_sd_vae():
    with torch.device("meta"):  # shapes only, no memory or init time
        vae = AutoencoderKL()
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert sum(p.numel() for p in vae.parameters()) == 83653863  # sd-vae-ft-ema
    assert shapes["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"] == (128, 256, 1, 1)  # reversed channels
    assert "decoder.up_blocks.0.resnets.2.conv1.weight" in shapes  # layers_per_block + 1 resnets
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in shapes
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in shapes
    assert shapes["encoder.mid_block.attentions.0.to_out.0.weight"] == (512, 512)


def test_vae_wrong_keys(tmp_path):
    sd = read_safetensors(os.path.join(TESTDATA, "vae_tiny", "diffusion_pytorch_model.safetensors"))
    del sd["decoder.conv_out.bias"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, sd)
    with pytest.raises(ValueError, match="decoder.conv_out.bias") as e:
        load_vae(path, config=json.load(open(os.path.join(TESTDATA, "vae_tiny", "config.json"))))
    assert "extra.weight" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(ValueError, match="wrong shape"):
        load_vae(os.path.join(TESTDATA, "vae_tiny", "diffusion_pytorch_model.safetensors"))  # SD config
    with pytest.raises(ValueError, match="not supported"):
        AutoencoderKL(act_fn="gelu")


def test_vae_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_vae(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_vae(tmp_path)


def test_safetensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f64": torch.randn(3, 2, generator=g, dtype=torch.float64), "f32": torch.randn(2, 3, 4, generator=g),
               "f16": torch.randn(5, generator=g).half(), "bf16": torch.randn(3, 3, generator=g).bfloat16(),
               "i64": torch.tensor([-(2 ** 40), 7]), "i32": torch.tensor([[1, -2]], dtype=torch.int32),
               "i16": torch.tensor([-300, 300], dtype=torch.int16), "i8": torch.tensor([-5, 5], dtype=torch.int8),
               "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3)}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    back = read_safetensors(path)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


def test_safetensors_malformed(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"w": torch.randn(16, 16)})
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # data cut short
    with pytest.raises(ValueError, match="truncated") as e:
        read_safetensors(path)
    assert str(path) in str(e.value)
    path.write_bytes(data[:40])  # header cut short
    with pytest.raises(ValueError, match="header says") as e:
        read_safetensors(path)
    assert str(path) in str(e.value)
    write_safetensors(path, {"w": torch.randn(2)})
    path.write_bytes(path.read_bytes().replace(b'"F32"', b'"F99"'))
    with pytest.raises(ValueError, match="bad header entry"):
        read_safetensors(path)
    for junk in [b"abc", b"\x04\x00\x00\x00\x00\x00\x00\x00oops", struct.pack("<Q", 2) + b"[]"]:
        path.write_bytes(junk)
        with pytest.raises(ValueError, match="not a safetensors file"):
            read_safetensors(path)


# =============================================================================================
# ddt.py: the DINOv2 teacher


DINO_WEIGHTS = os.path.join(TESTDATA, "dinov2_tiny_pretrain.pth")


@pytest.fixture(scope="module")
def dino():
    return load_dino(DINO_WEIGHTS)


@pytest.fixture(scope="module")
def golden_dino():
    return torch.load(f"{TESTDATA}/dinov2_tiny_io.pt", weights_only=True)


def test_dino_loads_strict_and_frozen(dino, golden_dino):
    cfg = golden_dino["config"]
    assert dino.embed_dim == cfg["embed_dim"] and len(dino.blocks) == cfg["depth"]
    assert dino.patch_size == cfg["patch_size"] and dino.blocks[0].attn.num_heads == cfg["num_heads"]
    assert not dino.training and all(not p.requires_grad for p in dino.parameters())
    assert all(p.dtype == torch.float32 for p in dino.parameters())
    sd = torch.load(DINO_WEIGHTS, weights_only=True)
    assert set(dino.state_dict()) == set(sd)  # every key of the file, mask_token included


def test_dino_golden_parity(dino, golden_dino):
    out = dino(golden_dino["images_01"])
    assert out.shape == golden_dino["patch_tokens"].shape  # (2, 64, 128): 128 px -> 112 px -> 8 x 8 tokens
    assert rel_err(out, golden_dino["patch_tokens"]) < 1e-5


def test_dino_pos_embed_cache(dino):
    a = dino.pos_embed_for(8, 8)
    assert dino.pos_embed_for(8, 8) is a and a.dtype == torch.float32
    assert a.shape == (1, 1 + 64, dino.embed_dim)
    assert torch.equal(a[:, 0], dino.pos_embed[:, 0])  # class token's embedding kept as is
    full = dino.pos_embed_for(37, 37)  # native grid: no resampling
    assert torch.equal(full, dino.pos_embed)


def test_dino_token_counts(dino):
    assert dino(torch.rand(1, 3, 256, 256)).shape == (1, 256, dino.embed_dim)  # 224 px -> 16 x 16
    assert dino(torch.rand(1, 3, 128, 256)).shape == (1, 8 * 16, dino.embed_dim)  # non-square


def test_dino_bf16_autocast(dino, golden_dino):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dino(golden_dino["images_01"])
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), golden_dino["patch_tokens"]) < 0.05  # ~5e-3 measured


def test_dino_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth") as e:
        load_dino(str(path))
    assert str(path) in str(e.value)


def test_dino_not_a_dino_state_dict(tmp_path):
    sd = torch.load(DINO_WEIGHTS, weights_only=True)
    sd.pop("blocks.1.ls2.gamma")
    sd["blocks.1.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="blocks.1.ls2.gamma"):
        load_dino(str(path))
    torch.save({"weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a DINOv2"):
        load_dino(str(path))


def test_dino_swiglu_not_supported(tmp_path):
    sd = torch.load(DINO_WEIGHTS, weights_only=True)
    sd["blocks.0.mlp.w12.weight"] = torch.zeros(1)
    path = tmp_path / "vitg.pth"
    torch.save(sd, path)
    with pytest.raises(NotImplementedError, match="vitg.pth"):
        load_dino(str(path))


def test_dino_default_heads():
    assert DINOv2(768, 1).blocks[0].attn.num_heads == 12  # head dim 64


# =============================================================================================
# prepare_latents.py


VAE_TINY = os.path.join(TESTDATA, "vae_tiny")


def run_prepare(monkeypatch, *argv):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "argv", ["prepare_latents.py", *map(str, argv)])
    prepare_latents.main()


def load_dataset(out):
    arrays = {f[:-4]: np.load(os.path.join(out, f)) for f in sorted(os.listdir(out)) if f.endswith(".npy")}
    return arrays, json.load(open(os.path.join(out, "meta.json")))


def assert_same(out_a, out_b):
    (a, meta_a), (b, meta_b) = load_dataset(out_a), load_dataset(out_b)
    assert meta_a == meta_b and a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def make_folder(root, corrupt=False):
    """3 classes, 8 images of assorted sizes, modes and extensions (+ files that must be ignored).
    Returns the expected file order."""
    rng = np.random.default_rng(0)
    specs = [("ant", "a.png", (40, 30), "RGB"), ("ant", "b.JPEG", (50, 50), "RGB"), ("ant", "c.jpg", (24, 70), "L"),
             ("bee", "a.PNG", (33, 21), "RGBA"), ("bee", "e.bmp", (20, 20), "RGB"), ("bee", "sub/d.webp", (64, 40), "RGB"),
             ("cat", "f.jpeg", (90, 45), "RGB"), ("cat", "g.png", (17, 30), "P")]
    files = []
    for cls, name, (w, h), mode in specs:
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(path)
        files.append(str(path))
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "bee" / "._a.jpg").write_bytes(b"macOS metadata, hidden")
    if corrupt:
        (root / "bee" / "x.jpg").write_bytes(np.random.default_rng(1).bytes(300))
        files.insert(6, str(root / "bee" / "x.jpg"))  # sorted after bee/sub/d.webp
    return files


def crop(path, res):
    with Image.open(path) as im:
        return center_crop_arr(im.convert("RGB"), res)


def test_center_crop_matches_hand_computed_steps():
    g = np.add.outer(np.arange(60) * 4, np.arange(100) * 2) % 256
    im = Image.fromarray(np.stack([g, 255 - g, g // 2], -1).astype(np.uint8))  # 100 x 60 (W x H)
    # no halving (60 < 64); short side 60 -> 32: (round(100 * 32 / 60), 32) = (53, 32); crop columns 10:42
    expected = np.array(im.resize((53, 32), Image.BICUBIC))[0:32, 10:42]
    assert np.array_equal(center_crop_arr(im, 32), expected)
    big = im.resize((200, 140), Image.BICUBIC)
    # 140 >= 64: BOX to (100, 70); 70 >= 64: BOX to (50, 35); then (round(50 * 32 / 35), 32) = (46, 32); cols 7:39
    expected = np.array(big.resize((100, 70), Image.BOX).resize((50, 35), Image.BOX)
                        .resize((46, 32), Image.BICUBIC))[0:32, 7:39]
    assert np.array_equal(center_crop_arr(big, 32), expected)


def test_list_images_order_and_bad_folders(tmp_path, monkeypatch):
    files = make_folder(tmp_path / "data")
    got, labels, names = list_images(str(tmp_path / "data"))
    assert got == files and names == ["ant", "bee", "cat"] and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(SystemExit, match="nope: no such folder"):
        run_prepare(monkeypatch, "--data-path", tmp_path / "nope", "--vae", "none", "--out", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty: no class subfolders"):
        list_images(str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(SystemExit, match="empty: no images"):
        list_images(str(tmp_path / "empty"))


def test_pixel_space_dataset(tmp_path, monkeypatch):
    files = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    run_prepare(monkeypatch, "--data-path", tmp_path / "data", "--vae", "none", "--resolution", 16, "--images", "--flip",
        "--out", out, "--chunk-size", 3, "--batch-size", 2, "--num-workers", 2)
    a, meta = load_dataset(out)
    crops = np.stack([crop(f, 16) for f in files])  # (8, 16, 16, 3)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert a["latents"].shape == (8, 2, 3, 16, 16) and a["latents"].dtype == np.float16
    assert np.array_equal(a["latents"][:, 0], x.half().numpy()) and not a["latents"][:, 1].any()
    assert np.array_equal(a["latents_flip"][:, 0], x.flip(3).half().numpy())
    assert np.array_equal(a["images"], crops) and a["valid"].all() and a["labels"].dtype == np.int64
    m = a["latents"][:, 0].astype(np.float64)
    assert np.allclose(meta["latent_mean"], m.mean((0, 2, 3))) and np.allclose(meta["latent_std"], m.std((0, 2, 3)))
    assert {k: meta[k] for k in ("format_version", "count", "latent_shape", "resolution", "vae", "scaling_factor",
                                 "class_names", "num_classes", "flip", "has_images", "invalid_files")} == {
        "format_version": 1, "count": 8, "latent_shape": [3, 16, 16], "resolution": 16, "vae": "none",
        "scaling_factor": 1.0, "class_names": ["ant", "bee", "cat"], "num_classes": 3, "flip": True,
        "has_images": True, "invalid_files": []}
    assert not os.path.exists(out / "meta.json.tmp")


def test_vae_dataset_matches_direct_encode(tmp_path, monkeypatch):
    files = make_folder(tmp_path / "data")
    run_prepare(monkeypatch, "--data-path", tmp_path / "data", "--vae", VAE_TINY, "--resolution", 16, "--flip",
        "--out", tmp_path / "out", "--batch-size", 3, "--num-workers", 0)
    a, meta = load_dataset(tmp_path / "out")
    x = torch.from_numpy(np.stack([crop(f, 16) for f in files])).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = pretrained.load_vae(VAE_TINY)
    for name, img in (("latents", x), ("latents_flip", x.flip(3))):
        with torch.no_grad():
            mean, logvar = vae.encode(img)  # (8, 4, 4, 4): the tiny VAE downsamples by 4
        assert a[name].shape == (8, 2, 4, 4, 4)
        assert np.allclose(a[name][:, 0], mean.numpy(), rtol=2e-3, atol=2e-3)
        assert np.allclose(a[name][:, 1], torch.exp(0.5 * logvar).numpy(), rtol=2e-3, atol=1e-5)
    assert meta["latent_shape"] == [4, 4, 4] and meta["scaling_factor"] == pretrained.VAE_SCALE
    assert meta["vae"] == VAE_TINY and not meta["has_images"] and "images" not in a


def test_corrupt_file_is_reported_and_excluded(tmp_path, monkeypatch, capsys):
    files = make_folder(tmp_path / "data", corrupt=True)
    run_prepare(monkeypatch, "--data-path", tmp_path / "data", "--vae", "none", "--resolution", 16, "--images",
        "--out", tmp_path / "out", "--chunk-size", 4, "--batch-size", 4, "--num-workers", 0)
    bad = str(tmp_path / "data" / "bee" / "x.jpg")
    assert f"warning: cannot read image {bad}" in capsys.readouterr().err
    a, meta = load_dataset(tmp_path / "out")
    assert a["valid"].tolist() == [f != bad for f in files] and meta["invalid_files"] == [bad]
    assert not a["latents"][6].any() and not a["images"][6].any() and meta["count"] == 9
    assert np.array_equal(a["images"][7], crop(files[7], 16))


def test_a_non_finite_latent_is_reported_and_excluded(tmp_path, monkeypatch, capsys):
    files = make_folder(tmp_path / "data")
    real = prepare_latents.encode_batch

    def nan_for_the_third(vae, images, precision="fp32"):  # as an fp16 VAE can give
        lat = real(vae, images, precision)
        return lat.index_fill(0, torch.tensor([2]), math.nan) if len(lat) > 2 else lat
    monkeypatch.setattr(prepare_latents, "encode_batch", nan_for_the_third)
    run_prepare(monkeypatch, "--data-path", tmp_path / "data", "--vae", "none", "--resolution", 16, "--out",
                tmp_path / "out", "--batch-size", 4, "--num-workers", 0)
    assert f"warning: image {files[2]} encodes to a non-finite latent (marked invalid)" in capsys.readouterr().err
    a, meta = load_dataset(tmp_path / "out")
    assert a["valid"].tolist() == [i not in (2, 6) for i in range(len(files))]  # the third of each batch of 4
    assert np.isfinite(a["latents"]).all() and meta["invalid_files"] == [files[2], files[6]]
    assert not a["latents"][2].any() and a["latents"][3].any()  # the invalid rows zeroed, the others kept


def test_interrupted_then_resumed_equals_one_run(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    args = ["--data-path", tmp_path / "data", "--vae", "none", "--resolution", 16, "--images", "--flip",
            "--chunk-size", 3, "--batch-size", 2, "--num-workers", 0]
    run_prepare(monkeypatch, *args, "--out", tmp_path / "ref")
    # a real interruption mid-chunk: encoder calls are the shape probe, then two per batch (image and flip);
    # chunk 0 is batches [0, 1] and [2] (calls 2-5); call 6, the first of chunk 1, raises
    encode, calls = prepare_latents.encode_batch, []

    def crashing_encode(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return encode(*a, **k)

    monkeypatch.setattr(prepare_latents, "encode_batch", crashing_encode)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(monkeypatch, *args, "--out", tmp_path / "cut")
    assert os.listdir(tmp_path / "cut" / ".progress") == ["chunk_000000.done"]
    assert not os.path.exists(tmp_path / "cut" / "meta.json")  # not marked complete
    monkeypatch.setattr(prepare_latents, "encode_batch", encode)
    run_prepare(monkeypatch, *args, "--out", tmp_path / "cut")
    assert_same(tmp_path / "ref", tmp_path / "cut")
    # lost progress: a chunk without its marker and with garbage rows is redone on the rerun
    shutil.copytree(tmp_path / "ref", tmp_path / "lost")
    os.remove(tmp_path / "lost" / ".progress" / "chunk_000001.done")
    os.remove(tmp_path / "lost" / "meta.json")
    for name in ("latents", "latents_flip", "images"):
        arr = np.load(tmp_path / "lost" / f"{name}.npy", mmap_mode="r+")
        arr[3:6] = 7
        arr.flush()
    run_prepare(monkeypatch, *args, "--out", tmp_path / "lost")
    assert_same(tmp_path / "ref", tmp_path / "lost")


def test_toy_is_deterministic_with_ten_distinct_classes(tmp_path, monkeypatch):
    run_prepare(monkeypatch, "--toy", "--out", tmp_path / "t1")
    run_prepare(monkeypatch, "--toy", "--out", tmp_path / "t2")
    assert_same(tmp_path / "t1", tmp_path / "t2")
    for f in ("latents.npy", "labels.npy", "valid.npy", "images.npy"):  # byte-identical files
        assert (tmp_path / "t1" / f).read_bytes() == (tmp_path / "t2" / f).read_bytes()
    a, meta = load_dataset(tmp_path / "t1")
    assert meta["num_classes"] == 10 and len(set(meta["class_names"])) == 10 and meta["count"] == 5000
    assert meta["has_images"] and meta["vae"] == "none" and meta["latent_shape"] == [3, 32, 32]
    assert a["images"].shape == (5000, 32, 32, 3) and np.bincount(a["labels"]).tolist() == [500] * 10
    # distinct at a glance: a nearest-class-mean classifier on 8 x 8 thumbnails already separates them
    images, labels, _ = make_toy_images(n_per_class=60, seed=1)
    thumbs = images.reshape(-1, 8, 4, 8, 4, 3).mean((2, 4)).reshape(len(images), -1)
    train, test = np.arange(len(images)) % 2 == 0, np.arange(len(images)) % 2 == 1
    centres = np.stack([thumbs[train & (labels == k)].mean(0) for k in range(10)])
    pred = ((thumbs[test][:, None] - centres) ** 2).sum(-1).argmin(1)
    assert (pred == labels[test]).mean() > 0.9


def test_other_settings_refused_then_overwritten(tmp_path, monkeypatch, capsys):
    make_folder(tmp_path / "data")
    args = ["--data-path", tmp_path / "data", "--vae", "none", "--out", tmp_path / "out", "--num-workers", 0]
    run_prepare(monkeypatch, *args, "--resolution", 16)
    run_prepare(monkeypatch, *args, "--resolution", 16)  # same settings: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"other settings \(resolution: 16 -> 24\).*--overwrite"):
        run_prepare(monkeypatch, *args, "--resolution", 24)
    assert load_dataset(tmp_path / "out")[1]["resolution"] == 16  # untouched
    run_prepare(monkeypatch, *args, "--resolution", 24, "--overwrite")
    a, meta = load_dataset(tmp_path / "out")
    assert meta["resolution"] == 24 and a["latents"].shape == (8, 2, 3, 24, 24)


def test_eight_gloo_ranks_write_the_bytes_one_process_writes(tmp_path):
    make_folder(tmp_path / "data", corrupt=True)  # 9 files in 5 chunks: 3 of the 8 ranks get none
    args = ["prepare_latents.py", "--data-path", str(tmp_path / "data"), "--vae", VAE_TINY, "--resolution", "16",
            "--images", "--flip", "--chunk-size", "2", "--batch-size", "2", "--num-workers", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for cmd, out in (([sys.executable], "one"), ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node=8"], "eight")):
        r = subprocess.run(cmd + args + ["--out", str(tmp_path / out)], cwd=HERE, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert_same(tmp_path / "one", tmp_path / "eight")
    assert load_dataset(tmp_path / "one")[1]["vae"] == VAE_TINY  # latents, not pixels
    for name in (f for f in os.listdir(tmp_path / "one") if os.path.isfile(tmp_path / "one" / f)):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "eight" / name).read_bytes(), name


# =============================================================================================
# sample.py


def tiny_model(in_channels=4, num_classes=10, seed=0):
    torch.manual_seed(seed)
    cfg = ddt.DDTConfig(in_channels=in_channels, patch_size=2, hidden_size=32, num_heads=2, encoder_depth=2,
                        decoder_depth=1, num_classes=num_classes)
    model = ddt.DDT(cfg)
    for p in model.final_layer.parameters():  # zero at init (v = 0): give it weights so samples move
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


class Spy:
    """Wraps a model and records, per call, the batch size, the time and whether the encoder ran."""

    def __init__(self, model):
        self.model, self.cfg, self.calls = model, model.cfg, []

    def __call__(self, x, t, y, z=None):
        self.calls.append((x.shape[0], float(t[0]), z is None))
        return self.model(x, t, y, z)


def sample_noise(seed, indices, shape):
    return sample.image_noise(seed, indices, shape)[0]


def euler(model, noise, y, N, cfg_scale=1.0, cfg_interval=(0.3, 1.0), encoder_steps=None, watch=None, **options):
    """sample_loop with the Euler sampler of N steps (the tests' shorthand)."""
    sampler = sample.Sampler(N, cfg_scale=cfg_scale, cfg_interval=cfg_interval, **options)
    return sample.sample_loop(model, noise, y, sampler, encoder_steps, watch=watch)


def reference_sample(model, noise, y, N, w, interval, last_step=0.04, shift=1.0, encoder_steps=None,
                     null_reuses_cond_z=False):
    """The released sampler written out: both halves (null first) at every step, z of both halves reused."""
    t = torch.cat([torch.linspace(0, 1 - last_step, N), torch.ones(1)])
    t = t / (t + (1 - t) * shift)
    B = len(y)
    yy = torch.cat([torch.full_like(y, model.cfg.num_classes), y])
    x, z = noise, None
    for i in range(N):
        run = encoder_steps is None or i in encoder_steps
        v, z_i, _ = model(torch.cat([x, x]), t[i].repeat(2 * B), yy, None if run else z)
        if run:
            z = torch.cat([z_i[B:], z_i[B:]]) if null_reuses_cond_z else z_i
        v_null, v_cond = v.chunk(2)
        v = v_null + w * (v_cond - v_null) if interval[0] < t[i] < interval[1] else v_cond
        x = x + v * (t[i + 1] - t[i])
    return x


def schedule_cost_loop(cost, steps):
    total, r = 0.0, 0
    for i in range(len(cost)):
        r = i if i in steps else r
        total += cost[i][r]
    return total


# ----------------------------------------------------------------------------------------------- DP


def test_solve_sharing_matches_brute_force():
    rng = np.random.default_rng(0)
    for N in range(1, 8):
        for kind in ("asymmetric", "symmetric", "cosine"):
            if kind == "cosine":  # a real 1 - cos matrix
                z = rng.normal(size=(N, 5))
                z /= np.linalg.norm(z, axis=1, keepdims=True)
                cost = 1 - z @ z.T
            else:
                cost = rng.random((N, N))
                cost = (cost + cost.T) / 2 if kind == "symmetric" else cost
            for k in range(1, N + 1):
                best = min(schedule_cost_loop(cost, (0,) + c) for c in itertools.combinations(range(1, N), k - 1))
                for c in (cost, torch.from_numpy(cost)):
                    steps = sample.solve_sharing(c, k)
                    assert steps[0] == 0 and len(steps) == k and steps == sorted(set(steps))
                    assert np.isclose(schedule_cost_loop(cost, steps), best, rtol=0, atol=1e-12)
                    assert np.isclose(sample.sharing_cost(cost, steps), best, rtol=0, atol=1e-12)


def test_solve_sharing_bad_k_and_uniform():
    for k in (0, 6):
        with pytest.raises(ValueError, match="--encoder-steps"):
            sample.solve_sharing(np.zeros((5, 5)), k)
    with pytest.raises(ValueError, match="--encoder-steps"):
        sample.uniform_schedule(5, 6)
    for n in range(1, 40):
        for k in range(1, n + 1):
            s = sample.uniform_schedule(n, k)
            assert len(s) == k and s[0] == 0 and s == sorted(set(s)) and s[-1] < n
    assert sample.uniform_schedule(250, 125) == list(range(0, 250, 2))
    assert sample.uniform_schedule(10, 10) == list(range(10))


# ----------------------------------------------------------------------------------------------- sampler


def test_timesteps_as_released():
    t = sample.timesteps(5, 0.04, 1.0)
    released = torch.cat([torch.linspace(0.0, 0.96, 5), torch.tensor([1.0])])
    assert torch.equal(t, released / (released + (1 - released) * 1.0))  # float32, the same ops
    assert torch.allclose(t, torch.tensor([0.0, 0.24, 0.48, 0.72, 0.96, 1.0]))
    shifted = sample.timesteps(5, 0.04, 3.0)
    assert torch.allclose(shifted, t / (t + (1 - t) * 3.0)) and shifted[-1] == 1.0
    assert torch.equal(sample.timesteps(1, 0.04), torch.tensor([0.0, 1.0]))


def test_all_encoder_steps_is_bit_identical_and_encoder_runs_k_times():
    model, N, B = tiny_model(), 8, 3
    noise, y = torch.randn(B, 4, 8, 8), torch.tensor([1, 5, 9])
    for w in (1.0, 2.0):
        a = euler(model, noise, y, N, w, encoder_steps=None)
        b = euler(model, noise, y, N, w, encoder_steps=list(range(N)))
        assert torch.equal(a, b)
    for k in (1, 3, 8):
        spy, stats = Spy(model), Counter()
        steps = sample.uniform_schedule(N, k)
        euler(spy, noise, y, N, 1.0, encoder_steps=steps, watch=sample.count_evals(stats))
        assert [i for i, c in enumerate(spy.calls) if c[2]] == steps
        assert stats == {"encoder": k * B, "decoder": N * B}
    with pytest.raises(ValueError):
        euler(model, noise, y, N, encoder_steps=[1, 3])  # must start at step 0


def test_cfg_scale_one_is_conditional_sampling():
    model, N = tiny_model(), 6
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    spy, stats = Spy(model), Counter()
    x = euler(spy, noise, y, N, cfg_scale=1.0, watch=sample.count_evals(stats))
    assert all(c[0] == 2 for c in spy.calls) and stats["decoder"] == N * 2
    t, ref = sample.timesteps(N), noise
    for i in range(N):  # plain conditional Euler
        ref = ref + model(ref, t[i].repeat(2), y)[0] * (t[i + 1] - t[i])
    assert torch.equal(x, ref)
    assert torch.allclose(x, reference_sample(model, noise, y, N, 1.0, (0.3, 1.0)), atol=1e-5)


def test_guidance_interval_is_strict_as_released():
    model, N = tiny_model(), 8
    t = sample.timesteps(N)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 7])
    spy = Spy(model)
    lo = t[3].item()  # exactly the time of step 3: no guidance there
    euler(spy, noise, y, N, 3.0, (lo, 1.0))
    assert [c[0] for c in spy.calls] == [2, 2, 2, 2, 4, 4, 4, 4]
    spy = Spy(model)
    euler(spy, noise, y, N, 3.0, (0.0, t[5].item()))  # t = 0 and t = hi excluded too
    assert [c[0] for c in spy.calls] == [2, 4, 4, 4, 4, 2, 2, 2]
    x = euler(model, noise, y, N, 3.0, (lo, 1.0))
    assert torch.allclose(x, reference_sample(model, noise, y, N, 3.0, (lo, 1.0)), atol=1e-5)


@pytest.mark.parametrize("interval", [(0.3, 1.0), (0.3, 0.7)])
def test_sharing_with_guidance_equals_both_halves_always(interval):
    model, N, B = tiny_model(), 10, 3
    noise, y = torch.randn(B, 4, 8, 8), torch.tensor([2, 4, 6])
    t = sample.timesteps(N)  # 0, .107, .213, .32, ...: step 2 is outside the interval, step 3 inside
    steps = [0, 2, 5, 8]
    spy, stats = Spy(model), Counter()
    x = euler(spy, noise, y, N, 4.0, interval, encoder_steps=steps, watch=sample.count_evals(stats))
    ref = reference_sample(model, noise, y, N, 4.0, interval, encoder_steps=steps)
    assert torch.allclose(x, ref, atol=1e-5), (x - ref).abs().max()
    wrong = reference_sample(model, noise, y, N, 4.0, interval, encoder_steps=steps, null_reuses_cond_z=True)
    assert (wrong - ref).abs().max() > 1e-3  # the test can tell a wrong unconditional z
    guided = [interval[0] < float(ti) < interval[1] for ti in t[:N]]
    assert spy.calls[2][0] == 2 * B and not guided[2] and guided[3]  # z for both halves at step 2
    assert all(c[0] == (2 * B if g else B) for i, (c, g) in enumerate(zip(spy.calls, guided)) if i != 2)
    assert stats["encoder"] == sum(spy.calls[i][0] for i in steps)
    assert stats["decoder"] == sum(c[0] for c in spy.calls)


def test_samples_do_not_depend_on_batching():
    model = tiny_model()
    noise = sample_noise(7, range(5), (4, 8, 8))
    assert torch.equal(noise, torch.cat([sample_noise(7, [0, 1], (4, 8, 8)),
                                         sample_noise(7, range(2, 5), (4, 8, 8))]))
    y = torch.tensor([0, 1, 2, 3, 4])
    full = euler(model, noise, y, 6, 2.0, encoder_steps=[0, 3])
    parts = [euler(model, noise[s:e], y[s:e], 6, 2.0, encoder_steps=[0, 3]) for s, e in [(0, 2), (2, 5)]]
    assert torch.allclose(full, torch.cat(parts), atol=1e-5)


def test_measured_cost_and_dp_beats_uniform():
    model, N = tiny_model(), 12
    record = []
    euler(model, torch.randn(2, 4, 8, 8), torch.tensor([0, 1]), N, watch=lambda i, n, z: record.append(z))
    assert len(record) == N and record[0].shape == (2, 16, 32) and record[0].dtype == torch.float32
    cost = sample.measure_sharing_cost(model, sample.Sampler(N, cfg_scale=2.0), (4, 8, 8), batch_size=4)
    assert cost.shape == (N, N) and cost.dtype == np.float64
    assert np.allclose(np.diag(cost), 0, atol=1e-6) and np.allclose(cost, cost.T, atol=1e-9)
    assert np.array_equal(cost, sample.measure_sharing_cost(model, sample.Sampler(N, cfg_scale=2.0), (4, 8, 8),
                                                            batch_size=4))
    for k in range(1, N + 1):
        dp, uni = sample.solve_sharing(cost, k), sample.uniform_schedule(N, k)
        assert sample.sharing_cost(cost, dp) <= sample.sharing_cost(cost, uni) + 1e-12


# ----------------------------------------------------------------------------------------------- command line


def save_tiny_ckpt(path, in_channels=3, vae="none", scaling=1.0, released=False):
    model = tiny_model(in_channels=in_channels, num_classes=4)
    sd = model.state_dict()
    if released:
        ckpt = {"state_dict": {f"ema_denoiser.{k}": v for k, v in sd.items()}}
    else:
        ckpt = {"config": asdict(model.cfg), "model": sd, "ema": sd, "step": 0,
                "data": {"scaling_factor": scaling, "vae": vae, "latent_shape": [in_channels, 8, 8],
                         "num_classes": 4, "class_names": ["cat", "dog", "owl", "eel"], "resolution": 8}}
    plumbing.save_atomic(ckpt, str(path))
    return str(path)


def cli(monkeypatch, *argv):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "argv", ["sample.py", *map(str, argv)])
    sample.main()


def test_npz_parts_wait_for_a_late_part_and_name_a_lost_one(tmp_path, monkeypatch, capsys):
    img = np.zeros((2, 8, 8, 3), np.uint8)
    parts = plumbing.Parts(str(tmp_path / "a.npz"), {"seed": 0}, 4, 2)
    plumbing.save_npz(parts.path(0, 2), img, [0, 1])
    monkeypatch.setattr(plumbing, "rank_world", lambda: (0, 2))  # as under torchrun: the other rank is on a node
    late = threading.Timer(0.5, plumbing.save_npz, (parts.path(2, 4), img + 1, [2, 3]))
    late.start()  # whose part the shared filesystem shows late
    assert parts.join([0, 1, 2, 3])[2:].min() == 1
    parts = plumbing.Parts(str(tmp_path / "b.npz"), {"seed": 0}, 4, 2)
    plumbing.save_npz(parts.path(0, 2), img, [0, 1])
    with pytest.raises(SystemExit) as stop:  # a stop signal ends the wait at once
        parts.join([0, 1, 2, 3], received=[signal.SIGTERM])
    assert stop.value.code == plumbing.EXIT_STOPPED and "stopped by SIGTERM: the finished parts are kept in" in \
        capsys.readouterr().out
    monkeypatch.setattr(plumbing, "PART_WAIT", 0.3)
    with pytest.raises(SystemExit, match=r"1 part\(s\) of --npz .*b.npz \(e.g. .*0000002_0000004_.*\) are missing "
                                         r"after every rank finished .*rerun the same command to resume"):
        parts.join([0, 1, 2, 3])
    assert os.path.exists(parts.path(0, 2)) and not os.path.exists(tmp_path / "b.npz")  # the finished part kept


def test_cli_npz_grid_and_resume(tmp_path, monkeypatch, capsys):
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    args = ["--ckpt", ckpt, "--num-samples", 10, "--num-steps", 6, "--batch-size", 4, "--cfg-scale", 2.0,
            "--encoder-steps", 3]
    cli(monkeypatch, *args, "--npz", tmp_path / "a.npz", "--out", tmp_path / "a.png")
    out = capsys.readouterr().out
    assert "encoder steps (DP" in out and "images/s" in out
    with np.load(tmp_path / "a.npz") as f:
        assert set(f.files) == {"arr_0", "arr_1"}
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (10, 8, 8, 3)
        assert f["arr_1"].dtype == np.int64 and f["arr_1"].tolist() == [i % 4 for i in range(10)]
        images = f["arr_0"]
    assert not (tmp_path / "a_parts").exists()
    cache = json.load(open(ckpt + ".sharing.json"))
    assert [len(v["steps"]) for v in cache.values()] == [3]
    W, H = Image.open(tmp_path / "a.png").size  # a row per class (3, 3, 2, 2 images), 8 px images shown at 64 px
    assert H == 4 * (64 + 2) and 3 * (64 + 2) < W < 3 * (64 + 2) + 40

    # resume: the first run dies after one batch; the rerun reads the DP schedule from the cache and samples the rest
    real, calls = sample.sample_loop, []

    def dies_after_one(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sample, "sample_loop", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        cli(monkeypatch, *args, "--npz", tmp_path / "b.npz")
    assert len(os.listdir(tmp_path / "b_parts")) == 1
    capsys.readouterr()

    def counting(*a, **k):
        calls.append(2)
        return real(*a, **k)

    monkeypatch.setattr(sample, "sample_loop", counting)
    cli(monkeypatch, *args, "--npz", tmp_path / "b.npz", "--out", tmp_path / "b.png")
    assert "cached" in capsys.readouterr().out and calls.count(2) == 2  # batches [4, 8) and [8, 10)
    with np.load(tmp_path / "b.npz") as f:
        assert np.array_equal(f["arr_0"], images)


def test_cli_latent_models(tmp_path, monkeypatch):
    # released (Lightning) layout with a preset, and a project checkpoint of a latent model; both need --vae
    released = tmp_path / "ddt_official_tiny.ckpt"  # the golden Lightning checkpoint: 4 + 2 blocks, 10 classes
    released.write_bytes(open(f"{HERE}/testdata/ddt_official_tiny.ckpt", "rb").read())
    monkeypatch.setitem(ddt.PRESETS, "DDT-T/2", ddt.DDTConfig(hidden_size=32, num_heads=2, encoder_depth=4,
                                                               decoder_depth=2, num_classes=10))
    cli(monkeypatch, "--ckpt", released, "--model", "DDT-T/2", "--vae", VAE_TINY, "--image-size", 32, "--num-steps", 3,
        "--classes", 3, 1, "--num-samples", 4, "--cfg-scale", 1.5, "--npz", tmp_path / "r.npz")
    with np.load(tmp_path / "r.npz") as f:  # latent (4, 4, 4) -> 16 x 16 pixels through the tiny VAE_TINY
        assert f["arr_0"].shape == (4, 16, 16, 3) and f["arr_1"].tolist() == [3, 1, 3, 1]
    latent = save_tiny_ckpt(tmp_path / "latent.pt", in_channels=4, vae=VAE_TINY, scaling=0.18215)
    cli(monkeypatch, "--ckpt", latent, "--vae", VAE_TINY, "--num-steps", 3, "--num-samples", 2, "--out", tmp_path / "l.png")
    assert (tmp_path / "l.png").exists()


def test_cli_bad_input(tmp_path, monkeypatch):
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    base = ["--ckpt", ckpt, "--num-steps", 4, "--out", tmp_path / "g.png"]
    with pytest.raises(SystemExit, match=r"--classes \[4\] out of range"):
        cli(monkeypatch, *base, "--classes", 1, 4)
    for k in (0, 5):
        with pytest.raises(SystemExit, match="--encoder-steps"):
            cli(monkeypatch, *base, "--encoder-steps", k)
    latent = save_tiny_ckpt(tmp_path / "latent.pt", in_channels=4, vae="sd-vae-ft-ema", scaling=0.18215)
    with pytest.raises(SystemExit, match="--vae"):
        cli(monkeypatch, "--ckpt", latent, "--num-steps", 4)
    released = save_tiny_ckpt(tmp_path / "released.ckpt", released=True)
    with pytest.raises(SystemExit, match="does not fit"):
        cli(monkeypatch, "--ckpt", released, "--model", "DDT-S/2", "--vae", VAE_TINY, "--num-steps", 4)
    with pytest.raises(SystemExit, match="does not exist"):
        cli(monkeypatch, "--ckpt", tmp_path / "missing.pt")
    with pytest.raises(SystemExit, match="is a folder, not a file; did you mean .*ckpt.pt"):
        cli(monkeypatch, "--ckpt", tmp_path)  # (the folder holds ckpt.pt)
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt, "--classes", "9"], cwd=HERE,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "out of range" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("solver", [["--sharing", "uniform"], ["--sde", "sde"]], ids=["ode", "sde"])
def test_two_ranks_give_the_same_npz(solver, tmp_path, monkeypatch):
    """One process and two gloo ranks write the same .npz, also with the SDE's per-image noise."""
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    args = ["--ckpt", ckpt, "--num-samples", 7, "--num-steps", 5, "--cfg-scale", 2.0, "--encoder-steps", 3,
            "--seed", 3, *solver]
    cli(monkeypatch, *args, "--batch-size", 4, "--npz", tmp_path / "one.npz")  # one process
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # two CPU ranks, also on a one-GPU machine
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "sample.py", *map(str, args), "--batch-size", "2", "--npz", str(tmp_path / "two.npz")],
                         cwd=HERE, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_1"], b["arr_1"])
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # batch-size rounding only
        one = a["arr_0"]
    if "--sde" in solver:
        model = pretrained.load_ddt(ckpt)
        noise, gens = sample.image_noise(3, range(7), (3, 8, 8))
        ode = sample.to_uint8(euler(model, noise, torch.tensor([i % 4 for i in range(7)]), 5, 2.0))
        assert np.abs(one.astype(int) - ode.astype(int)).max() > 10  # the SDE noise is in the samples
    else:
        assert "encoder steps (uniform): [0, 2, 3]" in two.stdout  # printed like a DP schedule


def test_every_script_help_lists_its_defaults(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--help"])
    for entry in (lambda: train.get_args(["--help"]), lambda: sample.main(["--help"]), bench.main,
                  lambda: prepare_latents.parse_args(["--help"]), lambda: evaluate.parse_args(["--help"]),
                  lambda: study.main(["--help"]), lambda: samplers.main(["--help"])):
        with pytest.raises(SystemExit):
            entry()
    out = " ".join(capsys.readouterr().out.split())  # (argparse wraps lines)
    for line in ("images per optimizer step, all ranks (default: 256)", "solver steps N (the paper: 250) (default: 250)",
                 "timed training steps (median reported) (default: 10)", "per rank (default: 64)",
                 "images per network call (default: 64)",
                 "training steps of every run (default: 2000)", "samples per model and setting (default: 1000)"):
        assert line in out
    assert "(default: None)" not in out and "(default: False)" not in out


# ----------------------------------------------------------------------------------------------- solvers (issue 18)


@pytest.fixture(scope="module")
def golden_samplers():
    return torch.load(os.path.join(TESTDATA, "samplers_official_tiny.pt"), weights_only=True)


def test_released_samplers_golden(tiny_ddt, golden_samplers):
    # AdamLMSampler (orders 1-3, with and without state_refresh_rate, a time shift) and EulerSampler with each
    # step function, run by the released code at the same noise (see the file's note)
    g, s = golden_samplers, golden_samplers["settings"]
    N, y, shape = s["num_steps"], torch.tensor(s["labels"]), tuple(s["latent_shape"])
    assert torch.equal(sample.image_noise(s["seed"], range(len(y)), shape)[0], g["noise"])
    outputs = {}
    for c in g["cases"]:
        noise, generators = sample.image_noise(s["seed"], range(len(y)), shape)
        steps = list(range(0, N, c["state_refresh_rate"]))
        sampler = sample.Sampler(N, c["order"], c["sde"], s["guidance"], tuple(s["interval"]), s["last_step"],
                                 c["timeshift"])
        x = sample.sample_loop(tiny_ddt, noise, y, sampler, steps, generators)
        assert rel_err(x, c["x"]) < 2e-6, (c["sampler"], c["order"], c["sde"], rel_err(x, c["x"]))
        outputs[c["sampler"], c["order"], c["sde"], c["state_refresh_rate"], c["timeshift"]] = c["x"]
        if c["sampler"] == "adams":
            mine = sample.adams_coefficients(sample.timesteps(N, s["last_step"], c["timeshift"]), c["order"])
            assert [len(r) for r in mine] == [len(r) for r in c["coeffs"]] == [min(c["order"], i + 1) for i in range(N)]
            diff = max(abs(a - b) for ra, rb in zip(mine, c["coeffs"]) for a, b in zip(ra, rb))
            assert diff < (3e-4 if c["order"] == 3 else 3e-7)  # order 3: the released float32 cancellation
    # the cases differ clearly, so each comparison above pins its own solver
    ode = outputs["euler", 1, "none", 1, 1.0]
    for key in [("adams", 2, "none", 1, 1.0), ("adams", 3, "none", 1, 1.0), ("euler", 1, "sde", 1, 1.0),
                ("euler", 1, "sde-mean", 1, 1.0), ("euler", 1, "sde-preserve", 1, 1.0), ("euler", 1, "sde", 3, 1.0)]:
        assert rel_err(outputs[key], ode) > 1e-3, key
    assert torch.equal(outputs["adams", 1, "none", 1, 1.0], ode)  # Adams of order 1 is Euler


def test_adams_coefficients_exact_where_the_released_float32_ones_are_not(golden_samplers):
    for n, released in golden_samplers["order3_coeffs"].items():
        t = sample.timesteps(n)
        mine = sample.adams_coefficients(t, 3)
        even = [i for i in range(2, n - 1)]  # the grid is even up to t = 0.96 (float32 linspace: to 1e-5)
        ab3 = np.array([5, -16, 23]) / 12  # the classical 3-step Adams-Bashforth weights
        assert np.abs(np.array([mine[i] for i in even]) - ab3).max() < 1e-3 * n / 100
        assert all(abs(sum(r) - 1) < 1e-12 for r in mine)
        off = (released[2:].double() - torch.tensor(mine[2:])).abs().nan_to_num(nan=math.inf)
        assert off.max() > 0.1  # released: up to 0.2 off at N = 100, and non-finite at N = 250
    assert not torch.isfinite(golden_samplers["order3_coeffs"][250]).all()


def test_sde_samples_do_not_depend_on_batching(tiny_ddt):
    shape, y = (4, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    for sde in ("sde", "sde-preserve"):
        noise, gens = sample.image_noise(7, range(5), shape)
        sampler = sample.Sampler(6, sde=sde, cfg_scale=2.0)
        full = sample.sample_loop(tiny_ddt, noise, y, sampler, [0, 3], gens)
        parts = []
        for s, e in [(0, 2), (2, 5)]:
            noise, gens = sample.image_noise(7, range(s, e), shape)
            parts.append(sample.sample_loop(tiny_ddt, noise, y[s:e], sampler, [0, 3], gens))
        assert torch.allclose(full, torch.cat(parts), atol=1e-5)
        other, gens = sample.image_noise(8, range(5), shape)  # other noise: other samples (the test can fail)
        noise, _ = sample.image_noise(7, range(5), shape)
        x = sample.sample_loop(tiny_ddt, noise, y, sampler, [0, 3], gens)
        assert (x - full).abs().max() > 1e-2
    with pytest.raises(ValueError, match="generator"):
        sample.sample_loop(tiny_ddt, noise, y, sample.Sampler(6, sde="sde"))
    for bad in (dict(order=4), dict(order=2, sde="sde"), dict(sde="ode")):
        with pytest.raises(ValueError, match="order"):
            sample.Sampler(6, **bad)


def adams_reference(model, noise, y, N, order, w, interval=(0.3, 1.0), last_step=0.04):
    """Adams written out, both halves at every step: (x_i list, z_i list (2B, tokens, D), x_N)."""
    t = sample.timesteps(N, last_step)
    c = sample.adams_coefficients(t, order)
    y2 = torch.cat([y, torch.full_like(y, model.cfg.num_classes)])
    x, xs, zs, vs = noise, [], [], []
    with torch.no_grad():
        for i in range(N):
            v, z, _ = model(torch.cat([x, x]), t[i].repeat(2 * len(y)), y2)
            xs.append(x)
            zs.append(z)
            v_cond, v_null = v.chunk(2)
            vs.append(v_null + w * (v_cond - v_null) if interval[0] < t[i] < interval[1] else v_cond)
            x = x + sum(c_j * v_j for c_j, v_j in zip(c[i], vs[-len(c[i]):])) * (t[i + 1] - t[i])
    return xs, zs, x


def calibration_batch(model, B, shape):
    """measure_sharing_cost's batch, written out: the noise of images 0..B-1 of seed 0, labels spread."""
    y = torch.tensor([i * model.cfg.num_classes // B for i in range(B)])
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(B)]), y


def test_sharing_costs_follow_the_solvers_trajectory():
    model, N, B, w, shape = tiny_model(), 7, 3, 2.5, (4, 8, 8)
    noise, y = calibration_batch(model, B, shape)
    xs, zs, x_N = adams_reference(model, noise, y, N, 2, w)
    zn = F.normalize(torch.stack(zs).double(), dim=-1)  # (N, 2B, tokens, D)
    direct = 1 - torch.einsum("ibnd,jbnd->ij", zn, zn).numpy() / (2 * B * zn.shape[2])
    cos2 = sample.measure_sharing_cost(model, sample.Sampler(N, 2, cfg_scale=w), shape, batch_size=B)
    assert np.allclose(cos2, direct, atol=1e-6)
    euler_cost = sample.measure_sharing_cost(model, sample.Sampler(N, cfg_scale=w), shape, batch_size=B)
    assert np.abs(cos2 - euler_cost).max() > 1e-4


def test_sharing_cache_distinguishes_solvers(tmp_path, monkeypatch, capsys):
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    model, seen = pretrained.load_ddt(ckpt), []
    real = sample.measure_sharing_cost
    monkeypatch.setattr(sample, "measure_sharing_cost",
                        lambda model, sampler, *a, **k: seen.append((sampler.order, sampler.sde)) or real(
                            model, sampler, *a, **k))
    args = argparse.Namespace(ckpt=ckpt, encoder_steps=3, sharing="dp", precision="fp32")
    solvers = [(1, "none"), (2, "none"), (3, "none"), (1, "sde")]
    for order, sde in solvers + solvers:  # the second round comes from the cache
        sample.sharing_schedule(args, sample.Sampler(6, order, sde, 2.0), model, (3, 8, 8), [str(tmp_path)])
    assert seen == solvers
    assert capsys.readouterr().out.count("cached") == 4
    keys = [json.loads(k) for k in json.load(open(ckpt + ".sharing.json"))]
    assert sorted((k["sampler"]["order"], k["sampler"]["sde"]) for k in keys) == sorted(solvers)


def test_cli_solver_flags(tmp_path, monkeypatch, capsys):
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    base = ["--ckpt", ckpt, "--num-steps", 4, "--out", tmp_path / "g.png"]
    with pytest.raises(SystemExit, match="--order 2 is for --solver adams"):
        cli(monkeypatch, *base, "--order", 2)
    with pytest.raises(SystemExit, match="--sde sde is for --solver euler"):
        cli(monkeypatch, *base, "--solver", "adams", "--sde", "sde")
    with pytest.raises(SystemExit, match=r"--order: invalid choice: 4 \(choose from 1, 2, 3\)"):
        cli(monkeypatch, *base, "--solver", "adams", "--order", 4)
    # Adams-2 with a DP schedule end to end: the .npz equals adams_sample with the cached schedule
    args = ["--ckpt", ckpt, "--num-samples", 4, "--num-steps", 8, "--cfg-scale", 2.0, "--encoder-steps", 4,
            "--solver", "adams", "--order", 2]
    cli(monkeypatch, *args, "--npz", tmp_path / "a.npz")
    (key, entry), = json.load(open(ckpt + ".sharing.json")).items()
    assert json.loads(key)["sampler"]["order"] == 2
    model, adams2 = pretrained.load_ddt(ckpt), sample.Sampler(8, 2, cfg_scale=2.0)
    assert entry["steps"] == sample.solve_sharing(sample.measure_sharing_cost(model, adams2, (3, 8, 8)), 4)
    x = sample.sample_loop(model, sample_noise(0, range(4), (3, 8, 8)), torch.tensor([0, 1, 2, 3]), adams2,
                           entry["steps"])
    with np.load(tmp_path / "a.npz") as f:
        assert np.abs(f["arr_0"].astype(int) - sample.to_uint8(x).astype(int)).max() <= 1




def table_rows(out):
    """The cells of the rows of the last markdown table printed in `out`, without its header."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("|---"))
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 1:] if line.startswith("|")]


def rel_rms(x, ref):
    """The frontier's deviation, written out: sqrt(sum (x - ref)^2 / sum ref^2) over the batch."""
    return math.sqrt(((x.double() - ref.double()) ** 2).sum().item() / (ref.double() ** 2).sum().item())


def test_frontier_rows_are_the_solvers_deviations(capsys):
    models, shape, y = [tiny_model(seed=0), tiny_model(seed=1)], (4, 8, 8), torch.tensor([0, 5])
    samplers.frontier(models, shape, torch.device("cpu"), "fp32", [4, 6], 2, 2.0, reference_steps=20)
    rows = {tuple(r[:3]): r[3:5] for r in table_rows(capsys.readouterr().out)}
    assert sorted(rows) == sorted((name, str(N), K) for name in ("Euler", "Adams-2", "Adams-3") for N in (4, 6)
                                  for K in ("-", str(N // 2)))
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(1000 * 1_000_003 + i))
                         for i in range(2)])  # the frontier's batch: seed 1000, written out
    for (name, N, K), (blocks, dev) in rows.items():
        order, N = {"Euler": 1, "Adams-2": 2, "Adams-3": 3}[name], int(N)
        devs = []
        for model in models:
            adams = sample.Sampler(N, order, cfg_scale=2.0)
            steps = None if K == "-" else sample.solve_sharing(sample.measure_sharing_cost(model, adams, shape), int(K))
            x = adams_reference(model, noise, y, N, order, 2.0)[2] if steps is None else sample.sample_loop(
                model, noise, y, adams, steps)
            devs.append(rel_rms(x, adams_reference(model, noise, y, 20, 1, 2.0)[2]))
        assert dev == f"{np.mean(devs):.4f} ± {np.std(devs, ddof=1):.4f}"
        if K == "-":  # E + D = 3 blocks per image and step, twice at the guided steps (both halves)
            guided = sum(0.3 < t < 1 for t in sample.timesteps(N)[:N].tolist())
            assert float(blocks) == 3 * (2 * guided + N - guided)
    assert float(rows["Adams-2", "6", "-"][1].split()[0]) < float(rows["Euler", "6", "-"][1].split()[0])
    # --reference-last-step: the reference ends with a shorter step than the samplers' 0.04
    samplers.frontier(models[:1], shape, torch.device("cpu"), "fp32", [4], 2, 2.0, 20, reference_last_step=0.01)
    row = {tuple(r[:3]): r[4] for r in table_rows(capsys.readouterr().out)}["Euler", "4", "-"]
    x = adams_reference(models[0], noise, y, 4, 1, 2.0)[2]
    assert row == f"{rel_rms(x, adams_reference(models[0], noise, y, 20, 1, 2.0, last_step=0.01)[2]):.4f}"
    assert row != f"{rel_rms(x, adams_reference(models[0], noise, y, 20, 1, 2.0)[2]):.4f}"


def test_heatmap_marks_both_schedules(tmp_path):
    rng = np.random.default_rng(0)
    z = np.cumsum(rng.normal(size=(12, 6)), axis=0)  # a drifting z: cost grows away from the diagonal
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    cost = 1 - z @ z.T
    dp, uni = samplers.heatmap(str(tmp_path / "h.png"), cost, 4, "test")
    assert dp == sample.solve_sharing(cost, 4) and uni == sample.uniform_schedule(12, 4) and dp != uni
    img = np.asarray(Image.open(tmp_path / "h.png").convert("RGB"))
    cell, top, left = 40, 34, 14  # 480 // 12 px per step

    def at(i, j):  # the colour at the centre of cell (i, j)
        return tuple(int(c) for c in img[top + i * cell + cell // 2, left + j * cell + cell // 2])

    white, red = (255, 255, 255), (230, 30, 30)
    for a, b in zip(dp, dp[1:] + [12]):  # the entries each schedule pays, cost[i, a]: DP below the diagonal
        assert all(at(i, a) == white for i in range(a + 1, b))
    for a, b in zip(uni, uni[1:] + [12]):  # uniform above it, transposed
        assert all(at(a, i) == red for i in range(a + 1, b))
    paid = {(i, a) for a, b in zip(dp, dp[1:] + [12]) for i in range(a, b)}
    assert all(at(i, j) not in (white, red) for i in range(12) for j in range(i) if (i, j) not in paid)


def test_samplers_cli_modes(tmp_path, capsys):
    a, b = save_tiny_ckpt(tmp_path / "a.pt"), save_tiny_ckpt(tmp_path / "b.pt", in_channels=4)
    with pytest.raises(SystemExit, match="share their config and latent shape"):
        samplers.main(["--ckpt", a, b, "--heatmap", str(tmp_path / "h.png")])
    with pytest.raises(SystemExit, match="improved DiT"):
        samplers.main(["--ckpt", IDIT_CKPT_SMALL(tmp_path), "--frontier"])
    with pytest.raises(SystemExit, match="--quality needs --train-data and --val-data"):
        samplers.main(["--ckpt", a, "--quality", str(tmp_path / "q")])
    ckpt = torch.load(a, weights_only=True)
    for sd in (ckpt["model"], ckpt["ema"]):
        sd["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"] * 50  # guidance matters
    torch.save(ckpt, a)
    samplers.main(["--ckpt", a, "--heatmap", str(tmp_path / "h.png"), "--num-steps", "6", "--encoder-steps", "2",
                   "--cfg-scale", "2.0"])
    line = capsys.readouterr().out.splitlines()[-1]
    cost = sample.measure_sharing_cost(pretrained.load_ddt(a), sample.Sampler(6, cfg_scale=2.0), (3, 8, 8))
    assert line == (f"wrote {tmp_path / 'h.png'}; K = 2: DP {sample.solve_sharing(cost, 2)}, uniform "
                    f"{sample.uniform_schedule(6, 2)}")
    samplers.heatmap(str(tmp_path / "direct.png"), cost, 2, f"{a}: N = 6, guidance 2.0")
    cli_img, direct = (np.asarray(Image.open(tmp_path / f)) for f in ("h.png", "direct.png"))
    assert cli_img.shape == (34 + 480 + 30, 14 + 6 * 80 + 8, 3) and np.array_equal(cli_img, direct)  # the model's cost


def IDIT_CKPT_SMALL(tmp_path):
    """A train.py checkpoint of a tiny improved DiT (3 channels, 8 x 8)."""
    model = DDT(DDTConfig(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, encoder_depth=2, decoder_depth=0,
                          num_classes=10))
    path = str(tmp_path / "idit.pt")
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": asdict(model.cfg),
                "data": {"latent_shape": [3, 8, 8], "scaling_factor": 1.0, "vae": "none"}}, path)
    return path


def test_sde_check_classifies_by_the_nearest_training_image(tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data", n=20, num_classes=4)
    model, shape = tiny_model(in_channels=3, num_classes=4), (3, 8, 8)
    samplers.sde_check([model], shape, torch.device("cpu"), "fp32", 4, data, 2, 2.0)
    rows = table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["training images (leave one out)", "ode", "sde", "sde-mean", "sde-preserve"]
    assert all(0 <= float(r[1]) <= 100 and float(r[2]) > 0 for r in rows)
    lat = np.load(os.path.join(data, "latents.npy"))[:, 0].astype(np.float32)
    labels = np.load(os.path.join(data, "labels.npy"))
    flat = lat.reshape(len(lat), -1)
    d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = d.argmin(1)  # leave one out, written out
    assert float(rows[0][1]) == float(f"{(labels[nearest] == labels).mean() * 100:.1f}")
    assert np.isclose(float(rows[0][2]), np.sqrt(d.min(1) / flat.shape[1]).mean(), atol=1e-4)
    # an oracle sampler that returns a training image of the class asked for: 100% agreement at distance 0
    first = {c: torch.from_numpy(lat[np.flatnonzero(labels == c)[0]]) for c in set(labels.tolist())}
    monkeypatch.setattr(sample, "sample_loop", lambda m, noise, y, *a, **k: torch.stack([first[int(c)] for c in y]))
    samplers.sde_check([model], shape, torch.device("cpu"), "fp32", 4, data, 2, 2.0)
    assert all(float(r[1]) == 100.0 and float(r[2]) == 0.0 for r in table_rows(capsys.readouterr().out)[1:])


# =============================================================================================
# train.py

TRAIN_TINY = ["--model", "DDT-S/2", "--hidden-size", "32", "--num-heads", "2", "--encoder-depth", "2",
              "--decoder-depth", "1", "--patch-size", "4", "--global-batch-size", "16", "--log-every", "1",
              "--sample-every", "0", "--num-workers", "0", "--lr", "2e-3"]


def make_dataset(path, n=32, latent_shape=(3, 8, 8), num_classes=4, resolution=None, images=False, seed=0,
                 flip=False):
    """A small dataset directory in prepare_latents.py's format, written by hand."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    lat = np.lib.format.open_memmap(os.path.join(path, "latents.npy"), "w+", np.float16, (n, 2, *latent_shape))
    lat[:, 0] = rng.uniform(-1, 1, (n, *latent_shape))
    lat[:, 1] = 0.05
    lat.flush()
    np.save(os.path.join(path, "labels.npy"), rng.integers(0, num_classes, n).astype(np.int64))
    np.save(os.path.join(path, "valid.npy"), np.ones(n, bool))
    if images:
        np.save(os.path.join(path, "images.npy"), rng.integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8))
    if flip:
        np.save(os.path.join(path, "latents_flip.npy"), lat[..., ::-1].astype(np.float16))
    meta = {"format_version": 1, "count": n, "latent_shape": list(latent_shape), "resolution": resolution or
            latent_shape[1], "vae": "none", "scaling_factor": 1.0, "class_names": [f"c{i}" for i in range(num_classes)],
            "num_classes": num_classes, "flip": flip, "has_images": images}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(path)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    run_script("prepare_latents.py", "--toy", "--out", out)
    return out


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_lowers_loss_and_writes_grid(toy_data, tmp_path):
    run = str(tmp_path / "run")
    train.main(["--data", toy_data, "--out-dir", run, *TRAIN_TINY, "--max-steps", "60", "--log-every", "20",
                "--sample-every", "60", "--sample-steps", "4"])
    log = read_log(run)
    assert [r["step"] for r in log] == [20, 40, 60] and log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert os.path.isfile(os.path.join(run, "samples", "0000060.png"))
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)  # plain data
    assert ckpt["step"] == 60 and ckpt["data"]["scaling_factor"] == 1.0
    ema = load_ddt(os.path.join(run, "ckpt.pt"))
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), ckpt["ema"].values()))


def test_train_exact_resume(tmp_path):
    data = make_dataset(tmp_path / "data", n=64)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(["--data", data, "--out-dir", a, *TRAIN_TINY, "--max-steps", "6", "--ckpt-every", "3"])
    train.main(["--data", data, "--out-dir", b, *TRAIN_TINY, "--max-steps", "3", "--ckpt-every", "3"])
    train.main(["--data", data, "--out-dir", b, *TRAIN_TINY, "--max-steps", "6", "--ckpt-every", "3"])  # resumes
    ca, cb = (torch.load(os.path.join(r, "ckpt.pt"), weights_only=True) for r in (a, b))
    assert ca["step"] == cb["step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert not torch.equal(ca["model"]["blocks.0.attn.qkv.weight"], ca["ema"]["blocks.0.attn.qkv.weight"])
    with pytest.raises(SystemExit, match="trained with"):  # another model in the same run directory
        train.main(["--data", data, "--out-dir", b, *TRAIN_TINY, "--max-steps", "8", "--hidden-size", "64"])
    with pytest.raises(SystemExit, match="--global-batch-size and --seed"):  # another data order
        train.main(["--data", data, "--out-dir", b, *TRAIN_TINY, "--max-steps", "8", "--global-batch-size", "32"])
    train.main(["--data", data, "--out-dir", b, *TRAIN_TINY, "--max-steps", "7", "--lr", "1e-5"])  # flags win
    assert torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["optimizer"]["param_groups"][0]["lr"] == 1e-5
    assert read_log(b)[-1]["lr"] == 1e-5
    c = str(tmp_path / "c")  # a run that went past its last checkpoint: the resumed steps are logged once
    train.main(["--data", data, "--out-dir", c, *TRAIN_TINY, "--max-steps", "5", "--log-every", "1",
                "--keep-every", "3"])
    shutil.copy(os.path.join(c, "ckpt_0000003.pt"), os.path.join(c, "ckpt.pt"))
    train.main(["--data", data, "--out-dir", c, *TRAIN_TINY, "--max-steps", "5", "--log-every", "1"])
    assert [r["step"] for r in read_log(c)] == [1, 2, 3, 4, 5]


def test_train_killed_at_any_moment_resumes_to_the_same_result(tmp_path):
    data = make_dataset(tmp_path / "data", n=64)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = [*TRAIN_TINY, "--max-steps", "150", "--ckpt-every", "7", "--log-every", "50"]
    train.main(["--data", data, "--out-dir", a, *flags])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", "--data", data, "--out-dir", b, *flags], cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(b, "ckpt.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL somewhere after the first checkpoint: no clean-up runs
    proc.wait()
    assert plumbing.load_checkpoint(os.path.join(b, "ckpt.pt"))["step"] % 7 == 0 or proc.returncode == 0
    train.main(["--data", data, "--out-dir", b, *flags])  # resumes from whatever checkpoint is there
    ca, cb = (torch.load(os.path.join(r, "ckpt.pt"), weights_only=True) for r in (a, b))
    assert cb["step"] == 150 and all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])
    assert [r["step"] for r in read_log(b)] == [50, 100, 150]  # steps redone after the resume are logged once
    with pytest.raises(SystemExit, match="past --max-steps 100"):
        train.main(["--data", data, "--out-dir", b, *TRAIN_TINY, "--max-steps", "100"])


def test_train_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = make_dataset(tmp_path / "data", n=64)
    run = str(tmp_path / "run")
    train.main(["--data", data, "--out-dir", run, *TRAIN_TINY, "--max-steps", "2", "--ckpt-every", "1"])
    lat = np.load(os.path.join(data, "latents.npy"), mmap_mode="r+")
    lat[:] = np.nan  # the data went bad
    lat.flush()
    with pytest.raises(SystemExit, match="non-finite loss or gradient at step 3"):
        train.main(["--data", data, "--out-dir", run, *TRAIN_TINY, "--max-steps", "4", "--ckpt-every", "1"])
    ckpt = plumbing.load_checkpoint(os.path.join(run, "ckpt.pt"))
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_train_repa_with_golden_dino(tmp_path):
    # 128 px images -> DINOv2 at 112 px -> 8 x 8 tokens; 16 x 16 latents at patch 2 -> 8 x 8 tokens
    data = make_dataset(tmp_path / "data", n=32, latent_shape=(4, 16, 16), resolution=128, images=True)
    run = str(tmp_path / "run")
    train.main(["--data", data, "--out-dir", run, *TRAIN_TINY, "--patch-size", "2", "--max-steps", "3",
                "--dino", DINO_WEIGHTS, "--repa-layer", "2"])
    log = read_log(run)
    assert all(0 < r["repa"] < 2 and r["loss"] == pytest.approx(r["fm"] + 0.5 * r["repa"]) for r in log)
    proj = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)["projector"]
    assert proj["4.weight"].shape == (128, 32)  # -> the teacher's width
    no_images = make_dataset(tmp_path / "noimg", n=32, latent_shape=(4, 16, 16))
    with pytest.raises(SystemExit, match="--images"):
        train.main(["--data", no_images, "--out-dir", str(tmp_path / "r2"), *TRAIN_TINY, "--dino", DINO_WEIGHTS])


def test_train_bad_input_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="prepare_latents.py"):
        train.main(["--data", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "run"), *TRAIN_TINY])
    assert not (tmp_path / "run").exists()  # nothing created for a run that cannot start
    data = make_dataset(tmp_path / "data", n=32, latent_shape=(4, 16, 16), resolution=128, images=True)
    with pytest.raises(SystemExit, match="--dino: .*nope.pth"):
        train.main(["--data", data, "--out-dir", str(tmp_path / "run"), *TRAIN_TINY, "--repa-layer", "1",
                    "--dino", str(tmp_path / "nope.pth")])
    os.makedirs(tmp_path / "run", exist_ok=True)
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot resume.*truncated or corrupt"):
        train.main(["--data", data, "--out-dir", str(tmp_path / "run"), *TRAIN_TINY])


def test_eight_ranks_equal_one_rank_and_grad_accumulation(tmp_path, monkeypatch):
    """The README's `torchrun --nproc_per_node=8 train.py` on 8 gloo ranks (global batch 64: 8 images a rank, with
    REPA, flips, EMA, val loss) runs, checkpoints, resumes, and gives what 1 rank gives, and 2 ranks x --grad-accum
    4 resuming the 8 ranks' checkpoint: a step does not depend on how its batch is split. Then sample.py on 8
    ranks writes the bytes 1 rank writes."""
    # 128 px images -> DINOv2 at 112 px -> 8 x 8 tokens; 16 x 16 latents at patch 2 -> 8 x 8 tokens
    data = make_dataset(tmp_path / "data", n=160, latent_shape=(4, 16, 16), resolution=128, images=True, flip=True)
    val = make_dataset(tmp_path / "val", n=200, latent_shape=(4, 16, 16), resolution=128, seed=1)  # 4 chunks of 64
    flags = ["--data", data, *TRAIN_TINY, "--patch-size", "2", "--global-batch-size", "64", "--dino", DINO_WEIGHTS,
             "--repa-layer", "2", "--val-data", val, "--val-every", "3", "--keep-every", "3"]
    one, eight, two = (str(tmp_path / r) for r in ("one", "eight", "two"))  # 2 steps an epoch: 6 steps, 3 epochs
    train.main([*flags, "--out-dir", one, "--max-steps", "6"])
    driver = tmp_path / "driver.py"  # train.py, then each rank's weights
    driver.write_text(f"import os, sys, torch\nsys.path.insert(0, {HERE!r})\nimport train\nmodel = train.main(sys.argv[1:])\n"
                      f"torch.save(model.state_dict(), sys.argv[sys.argv.index('--out-dir') + 1] + "
                      f"'/rank' + os.environ['RANK'] + '.pt')\n")
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # CPU ranks, also on a GPU machine
    for world, out, steps, extra in ((8, eight, 3, []), (8, eight, 6, []), (2, two, 6, ["--grad-accum", "4"])):
        if out == two:  # 2 ranks resume the 8 ranks' step-3 checkpoint
            os.makedirs(two)
            shutil.copy(os.path.join(eight, "ckpt_0000003.pt"), os.path.join(two, "ckpt.pt"))
        run_script("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(driver), *flags,
                   "--out-dir", out, "--max-steps", str(steps), *extra, env=env)
    ranks = [torch.load(os.path.join(eight, f"rank{r}.pt"), weights_only=True) for r in range(8)]
    assert all(torch.equal(ranks[0][k], r[k]) for r in ranks for k in r)  # the ranks stay identical
    c1, c8, c2 = (torch.load(os.path.join(r, "ckpt.pt"), weights_only=True) for r in (one, eight, two))
    assert c1["step"] == c8["step"] == c2["step"] == 6
    for c in (c8, c2):
        for key in ("model", "ema", "projector"):
            assert max_rel_diff(c1[key], c[key]) < 1e-5, key
        assert max_rel_diff(c1["optimizer"]["state"], c["optimizer"]["state"]) < 1e-4
    assert max_rel_diff(c1["model"], plumbing.load_checkpoint(os.path.join(one, "ckpt_0000003.pt"))["model"]) > 1e-3
    l1, l8, l2 = (read_log(r) for r in (one, eight, two))
    assert [r["step"] for r in l8] == [r["step"] for r in l1] and [r["step"] for r in l2] == [4, 5, 6, 6]
    by_step = lambda log: {(r["step"], "val_loss" in r): r for r in log}
    for log in (l8, l2):
        for key, r in by_step(log).items():
            for field in ("loss", "fm", "repa", "grad_norm", "val_loss", "val_loss_ema"):
                if field in r:
                    assert r[field] == pytest.approx(by_step(l1)[key][field], rel=1e-5), (key, field)
    # sample.py: 8 ranks write the bytes 1 rank writes (the same --batch-size, so the same batches)
    args = ["--ckpt", os.path.join(eight, "ckpt.pt"), "--num-samples", 20, "--num-steps", 4, "--cfg-scale", 2.0,
            "--batch-size", 2, "--sde", "sde"]  # the SDE: per-image noise drawn on the ranks
    cli(monkeypatch, *args, "--npz", tmp_path / "s1.npz")
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", "sample.py", *map(str, args),
               "--npz", str(tmp_path / "s8.npz"), env=env)
    assert (tmp_path / "s1.npz").read_bytes() == (tmp_path / "s8.npz").read_bytes()


# =============================================================================================
# the improved DiT (DDTConfig(decoder_depth=0), the paper's baseline) and train.py's validation loss

IDIT_TINY = DDTConfig(in_channels=4, patch_size=2, hidden_size=32, num_heads=2, encoder_depth=4, decoder_depth=0,
                      num_classes=10)  # the config of testdata/idit_official_tiny.ckpt
IDIT_CKPT = os.path.join(TESTDATA, "idit_official_tiny.ckpt")


@pytest.fixture(scope="module")
def golden_idit():
    return torch.load(os.path.join(TESTDATA, "idit_official_tiny_io.pt"), weights_only=True)


@pytest.mark.parametrize("case", [0, 1], ids=["square", "non-square"])
def test_idit_golden_parity(golden_idit, case):
    model = load_ddt(IDIT_CKPT, IDIT_TINY)  # the released layout, strictly
    g = golden_idit["cases"][case]
    with torch.no_grad():
        v, z, _ = model(g["x"], g["t"], g["y"])
        v2, _, h = model(g["x"], g["t"], g["y"], repa_layer=2)  # the released REPA hook sat on block 2's output
    assert z is None and rel_err(v, g["v"]) < 1e-5 and torch.equal(v2, v) and rel_err(h, g["h"]) < 1e-5


def test_idit_is_the_ddt_without_its_decoder(golden_idit):
    model = load_ddt(IDIT_CKPT, IDIT_TINY)
    assert {k.split(".")[0] for k in model.state_dict()} == {"x_embedder", "t_embedder", "y_embedder", "blocks",
                                                             "final_layer"}  # the released names, no s_embedder
    g = golden_idit["cases"][0]
    with torch.no_grad():
        raw = load_ddt(IDIT_CKPT, IDIT_TINY, ema=False)
        assert rel_err(raw(g["x"], g["t"], g["y"])[0], g["v"]) > 1e-3  # the golden outputs are the EMA weights'
        with pytest.raises(ValueError, match="no z to reuse"):
            model(g["x"], g["t"], g["y"], z=torch.zeros(2, 16, 32))
        assert torch.equal(DDT(IDIT_TINY)(g["x"], g["t"], g["y"])[0], torch.zeros_like(g["x"]))  # released init
    with pytest.raises(CheckpointError, match="an improved DiT"):  # iDiT weights, a DDT config
        load_ddt(IDIT_CKPT, TINY)
    with pytest.raises(CheckpointError, match="(?s)unexpected.*s_embedder.*a DDT"):  # DDT weights, an iDiT config
        load_ddt(os.path.join(TESTDATA, "ddt_official_tiny.ckpt"), replace(IDIT_TINY, encoder_depth=6))
    with torch.device("meta"):  # the hint names the preset that fits
        weights, ddt_s = DDT(PRESETS["iDiT-S/2"]).state_dict(), DDT(PRESETS["DDT-S/2"])
    with pytest.raises(CheckpointError, match="preset iDiT-S/2 fits"):
        pretrained.check_state_dict(ddt_s, weights, "released_idit_s.ckpt")


def test_idit_presets_parameter_counts_and_flops():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in DDT(cfg).parameters()) for name, cfg in PRESETS.items()}
    # what the released improved_dit.DiT counts, built on the meta device (XL: 28 x 1152, L: 24 x 1024)
    assert counts["iDiT-XL/2"] == 674_626_768 and counts["iDiT-L/2"] == 457_630_736
    for size in ("Toy/4", "S/2", "B/2", "L/2", "XL/2"):
        d, i = PRESETS[f"DDT-{size}"], PRESETS[f"iDiT-{size}"]
        assert i.decoder_depth == 0 and i.encoder_depth == d.encoder_depth + d.decoder_depth
        assert replace(i, encoder_depth=0) == replace(d, encoder_depth=0, decoder_depth=0)  # width, heads, patch...
        C, p, D = d.in_channels, d.patch_size, d.hidden_size
        assert counts[f"DDT-{size}"] - counts[f"iDiT-{size}"] == C * p * p * D + D  # DDT's second patch embedding
    from torch.utils.flop_counter import FlopCounterMode
    cases = [(replace(TINY, num_classes=4), 8, 12), (replace(IDIT_TINY, num_classes=4), 8, 12),
             (PRESETS["DDT-XL/2"], 32, 32), (PRESETS["iDiT-XL/2"], 32, 32)]  # XL/2 at 256 px: 32 x 32 latents
    for cfg, H, W in cases:  # bench.py's and MFU's FLOPs against a count of the model's own products
        with torch.device("meta"), FlopCounterMode(display=False) as fc:  # shapes only: no arithmetic is done
            DDT(cfg)(torch.randn(2, cfg.in_channels, H, W), torch.rand(2), torch.tensor([1, 2]))
        counted = {m: sum(c.values()) for m, c in fc.get_flop_counts().items()}  # matmuls and attention
        assert 2 * ddt.flops_per_image(cfg, H, W) == counted["Global"] - counted["DDT.t_embedder"]  # (its MLP:
        # left out)
    assert 3 * ddt.flops_per_image(PRESETS["DDT-XL/2"], 32, 32) == 788_876_623_872  # ~0.79 TFLOP a training image
    assert 3 * ddt.flops_per_image(PRESETS["iDiT-XL/2"], 32, 32) == 711_690_485_760


def test_idit_samples_and_refuses_encoder_steps(tmp_path, monkeypatch):
    monkeypatch.setitem(ddt.PRESETS, "iDiT-T/2", IDIT_TINY)
    args = ["--ckpt", IDIT_CKPT, "--model", "iDiT-T/2", "--vae", VAE_TINY, "--image-size", 32, "--num-steps", 3,
            "--num-samples", 2, "--cfg-scale", 1.5]
    with pytest.raises(SystemExit, match="improved DiT .* no z to share; leave --encoder-steps out"):
        cli(monkeypatch, *args, "--encoder-steps", 3, "--out", tmp_path / "a.png")
    cli(monkeypatch, *args, "--npz", tmp_path / "b.npz")
    assert not (tmp_path / "a.png").exists()
    model, vae = pretrained.load_ddt(IDIT_CKPT, IDIT_TINY), load_vae(VAE_TINY)  # the same samples, written out
    x = adams_reference(model, sample_noise(0, range(2), (4, 4, 4)), torch.tensor([0, 1]), 3, 1, 1.5)[2]
    with torch.no_grad(), np.load(tmp_path / "b.npz") as f:
        assert f["arr_1"].tolist() == [0, 1]
        assert np.abs(f["arr_0"].astype(int) - sample.to_uint8(vae.decode(x / 0.18215)).astype(int)).max() <= 1
    out = run_script("bench.py", "--model", "iDiT-S/2", "--hidden-size", "32", "--num-heads", "2", "--encoder-depth",
                     "2", "--image-size", "8", "--batch-size", "2", "--sample", "--num-steps", "3").stdout
    assert "no encoder sharing" in out


def test_idit_trains_with_repa(tmp_path):
    data = make_dataset(tmp_path / "data", n=32, latent_shape=(4, 16, 16), resolution=128, images=True)
    run = str(tmp_path / "run")
    flags = [*TRAIN_TINY, "--decoder-depth", "0", "--encoder-depth", "3", "--patch-size", "2", "--dino", DINO_WEIGHTS]
    with pytest.raises(SystemExit, match="1..3 .*all the blocks of an improved DiT"):
        train.main(["--data", data, "--out-dir", run, *flags, "--repa-layer", "4"])
    train.main(["--data", data, "--out-dir", run, *flags, "--repa-layer", "3", "--max-steps", "2"])
    assert all(0 < r["repa"] < 2 for r in read_log(run))
    model = load_ddt(os.path.join(run, "ckpt.pt"))
    assert model.cfg.decoder_depth == 0 and not hasattr(model, "s_embedder")


def test_val_loss_is_the_documented_definition(tmp_path):
    val_dir = make_dataset(tmp_path / "val", n=20, seed=1)
    meta = prepare_latents.read_meta(val_dir, "--data")
    val = evaluate.ValSet(val_dir, None, meta, val_dir)
    assert sorted(val.rows) == list(range(20))
    assert list(evaluate.ValSet(val_dir, 9, meta, val_dir).rows) == list(val.rows[:9])  # --val-size: a prefix
    grid = torch.tensor(evaluate.VAL_TIMES, dtype=torch.float64)  # the midpoint quantiles of t = sigmoid(randn)
    assert torch.allclose(torch.logit(grid), torch.special.ndtri((torch.arange(8, dtype=torch.float64) + 0.5) / 8))
    model = tiny_model(in_channels=3, num_classes=4)
    got = evaluate.val_loss(model, val, torch.device("cpu"))
    lat, labels = np.load(os.path.join(val_dir, "latents.npy")), np.load(os.path.join(val_dir, "labels.npy"))
    per_t = [[] for _ in range(8)]
    with torch.no_grad():  # one image at a time, as the docstring says
        for j, row in enumerate(val.rows):
            g = torch.Generator().manual_seed(int(row) * 1_000_003 + j % 8)
            mean, std = torch.from_numpy(lat[row].astype(np.float32))
            x = mean + std * torch.randn(mean.shape, generator=g)  # scaling factor 1
            noise = torch.randn(mean.shape, generator=g)
            t = torch.tensor([evaluate.VAL_TIMES[j % 8]], dtype=torch.float32)
            v = model((t * x + (1 - t) * noise)[None], t, torch.tensor([labels[row]]))[0]
            per_t[j % 8].append((v[0] - (x - noise)).pow(2).mean().item())
    assert np.allclose(got["loss_t"], [np.mean(l) for l in per_t], rtol=1e-5, atol=0)
    assert got["loss"] == pytest.approx(np.mean([np.mean(l) for l in per_t]), rel=1e-5)


def test_val_loss_same_for_ranks_batch_sizes_and_resume(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=64)
    val = make_dataset(tmp_path / "val", n=150, seed=1)  # chunks of 64, 64, 22 images: both ranks get work
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = [*TRAIN_TINY, "--val-data", val, "--ckpt-every", "2", "--log-every", "2"]
    train.main(["--data", data, "--out-dir", a, *flags, "--max-steps", "4"])
    train.main(["--data", data, "--out-dir", b, *flags, "--max-steps", "2"])
    train.main(["--data", data, "--out-dir", b, *flags, "--max-steps", "4"])  # resumed
    keys = ("step", "val_loss", "val_loss_ema", "val_loss_t", "val_loss_ema_t", "val_size")

    def fields(records):
        return [{k: r[k] for k in keys} for r in records if "val_loss" in r]

    va, vb = fields(read_log(a)), fields(read_log(b))
    assert [r["step"] for r in va] == [2, 4] and va == vb  # bit-exact after a resume
    assert va[0]["val_size"] == 150 and len(va[0]["val_loss_t"]) == 8 and va[1]["val_loss"] != va[1]["val_loss_ema"]
    # the batch size of the run that scores: with --lr 0 the weights stay at their (seeded) init, so runs of
    # batch 16 and 8 hold the same weights at step 2 and must log the same val loss
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    train.main(["--data", data, "--out-dir", c, *flags, "--max-steps", "2", "--lr", "0"])
    train.main(["--data", data, "--out-dir", d, *flags, "--max-steps", "2", "--lr", "0", "--global-batch-size", "8"])
    vc, vd = fields(read_log(c)), fields(read_log(d))
    assert vc == vd and vc[0]["val_loss"] != va[0]["val_loss"]
    before = sorted((f, os.path.getmtime(os.path.join(a, f))) for f in os.listdir(a))
    capsys.readouterr()
    rec = train.main(["--data", data, "--out-dir", a, *flags, "--eval-only"])
    assert fields([rec]) == va[1:]  # the checkpoint scored alone gives what its run logged
    assert sorted((f, os.path.getmtime(os.path.join(a, f))) for f in os.listdir(a)) == before  # wrote nothing
    assert capsys.readouterr().out.startswith(f"step 4 | val_loss {rec['val_loss']:.4g} | val_loss_ema ")
    driver = tmp_path / "driver.py"
    driver.write_text(f"import json, os, sys\nsys.path.insert(0, {HERE!r})\nimport train\n"
                      f"rec = train.main(sys.argv[1:])\n"
                      f"json.dump(rec, open({str(tmp_path / 'rank')!r} + os.environ['RANK'], 'w'))\n")
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver), "--data", data,
               "--out-dir", a, *flags, "--eval-only", env={"CUDA_VISIBLE_DEVICES": ""})  # two gloo ranks
    ranks = [json.load(open(tmp_path / f"rank{r}")) for r in (0, 1)]
    assert fields(ranks) == va[1:] * 2


def test_val_data_must_match_the_training_set(tmp_path):
    import re
    data = make_dataset(tmp_path / "data", n=32)
    run = str(tmp_path / "run")
    vae = make_dataset(tmp_path / "vae", n=16)
    meta = json.load(open(os.path.join(vae, "meta.json")))
    json.dump({**meta, "vae": "/weights/sd-vae-ft-ema"}, open(os.path.join(vae, "meta.json"), "w"))
    for bad, what in ((make_dataset(tmp_path / "shape", n=16, latent_shape=(3, 16, 16)), "latent_shape"),
                      (make_dataset(tmp_path / "classes", n=16, num_classes=5), "num_classes"),
                      (vae, "vae 'none' vs '/weights/sd-vae-ft-ema'")):
        with pytest.raises(SystemExit, match=f"--val-data {re.escape(bad)} does not match --data "
                                             f"{re.escape(data)}: .*{re.escape(what)}"):
            train.main(["--data", data, "--out-dir", run, *TRAIN_TINY, "--val-data", bad, "--max-steps", "1"])
    assert not os.path.exists(run)  # refused before --out-dir is made
    good = make_dataset(tmp_path / "good", n=16, seed=1)
    for size in ("7", "17"):
        with pytest.raises(SystemExit, match=f"--val-size {size}: must be between 8 .* the 16 valid images"):
            train.main(["--data", data, "--out-dir", run, *TRAIN_TINY, "--val-data", good, "--val-size", size])
    with pytest.raises(SystemExit, match="--eval-only: checkpoint .* does not exist"):
        train.main(["--data", data, "--out-dir", str(tmp_path / "none"), *TRAIN_TINY, "--val-data", good,
                    "--eval-only"])
    r = run_script("train.py", "--data", data, "--out-dir", run, "--eval-only", check=False)
    assert r.returncode == 1 and "--eval-only needs --val-data" in r.stderr


def test_toy_val_split_holds_other_images_of_the_same_classes(toy_data, tmp_path):
    out = str(tmp_path / "toy_val")
    prepare_latents.main(["--toy", "--split", "val", "--out", out])
    val = evaluate.ValSet(out, None, prepare_latents.read_meta(toy_data, "--data"), toy_data)  # matches the training set
    assert len(val.rows) == 1000 and np.bincount(val.labels).tolist() == [100] * 10
    held_out = np.load(os.path.join(out, "images.npy"))
    assert np.array_equal(held_out, make_toy_images(100, 32, seed=1)[0])  # seeded: the same on every machine
    seen = {im.tobytes() for im in np.load(os.path.join(toy_data, "images.npy"))}
    assert not any(im.tobytes() in seen for im in held_out)
    with pytest.raises(SystemExit):  # --split is the toy set's; a folder of held-out images is its own --data-path
        prepare_latents.parse_args(["--data-path", str(tmp_path), "--vae", "none", "--split", "val", "--out", out])


# =============================================================================================
# bench.py, torch.compile, and the GPU-only checks (skipped without CUDA)


def test_bench_baseline_computes_the_same_function(tiny_ddt, golden_ddt):
    g = golden_ddt["cases"][1]
    with torch.no_grad(), bench.released_patchify():
        v, z, _ = bench.as_released(tiny_ddt)(g["x"], g["t"], g["y"])
    assert rel_err(v, g["v"]) < 1e-5 and rel_err(z, g["z"]) < 1e-5
    assert ddt.patchify is not None and ddt.patchify.__name__ == "patchify"  # restored


def test_bench_runs():
    small = ["--hidden-size", "32", "--num-heads", "2", "--encoder-depth", "2", "--decoder-depth", "1",
             "--image-size", "8", "--batch-size", "2"]
    out = run_script("bench.py", *small, "--steps", "1", "--warmup", "1", "--compare").stdout
    assert "images/s" in out and "nanoDDT / released step time" in out
    out = run_script("bench.py", *small, "--sample", "--num-steps", "6", "--encoder-steps", "2").stdout
    assert "ideal" in out
    out = run_script("bench.py", *small, "--repa", "--memory").stdout
    assert "saved for backward" in out and "teacher 0.32" in out  # DINOv2-B/14's 86M float32 weights


def test_bench_step_memory_counts_the_state_and_what_backward_saves():
    cfg = replace(TINY, encoder_depth=2, decoder_depth=1)
    torch.manual_seed(0)
    teacher = pretrained.DINOv2(64, 1).eval().requires_grad_(False)
    rec = {}
    for batch in (2, 4):
        step = bench.TrainStep(ddt.DDT(cfg), batch, (4, 8, 8), torch.device("cpu"), "fp32", teacher=teacher)
        rec[batch] = bench.step_memory(step)
    n = sum(p.numel() for p in step.student.parameters())  # the model and REPA's projector
    r = rec[2]
    assert r["weights"] == r["gradients"] == 4 * n and r["adamw"] == 8 * n
    assert r["ema"] == 4 * sum(p.numel() for p in step.ema.parameters()) < r["weights"]
    assert r["teacher"] == 4 * sum(p.numel() for p in teacher.parameters())
    assert math.isfinite(r["loss"]) and r["seconds"] > 0
    # in float32 nothing of autograd's saved tensors is fixed: twice the images, twice the bytes (to a few %)
    assert 0 < r["activations"] and 1.8 < rec[4]["activations"] / r["activations"] < 2.05

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_gpu_golden_parity_fp32_and_bf16(tiny_ddt, golden_ddt):
    model = load_ddt(os.path.join(TESTDATA, "ddt_official_tiny.ckpt"), TINY).cuda()
    g = {k: v.cuda() for k, v in golden_ddt["cases"][1].items()}
    with torch.no_grad():
        v, _, _ = model(g["x"], g["t"], g["y"])
        with torch.autocast("cuda", torch.bfloat16):
            vb, _, _ = model(g["x"], g["t"], g["y"])
    assert rel_err(v, g["v"]) < 1e-4 and torch.isfinite(vb).all() and rel_err(vb, g["v"]) < 5e-2


def test_compile_fullgraph_matches_eager():
    # no graph breaks (fullgraph=True), z reuse included; on a GPU in bf16 through inductor, on the CPU in float32
    # through aot_eager (the same graphs without inductor's code: that is test_train_compile_on_the_cpu_...'s)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = DDT(DDTConfig(in_channels=4, patch_size=2, hidden_size=32, num_heads=2, encoder_depth=2,
                          decoder_depth=1, num_classes=10)).to(device)
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(2, 4, 8, 8, device=device), torch.rand(2, device=device), torch.tensor([1, 2], device=device)
    with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
        v, z, _ = model(x, t, y)
        compiled = torch.compile(model, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
        vc, zc, _ = compiled(x, t, y)
        vr, _, _ = compiled(x, t, y, z=zc)
    tol = 2e-2 if device == "cuda" else 1e-5
    assert rel_err(vc, v) < tol and rel_err(zc, z) < tol and rel_err(vr, v) < tol


def test_train_compile_on_the_cpu_matches_eager(tmp_path, monkeypatch):
    """train.py --compile (inductor: C++ on the CPU) gives eager's losses and, after 2 AdamW steps, its weights to
    rounding; a machine where inductor cannot build its code gets a message that names --compile."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's inductor, on a GPU machine too
    data = make_dataset(tmp_path / "data", n=32)
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        runs[name] = str(tmp_path / name)
        train.main(["--data", data, "--out-dir", runs[name], *TRAIN_TINY, "--max-steps", "2", *extra])
    (le, ce), (lc, cc) = ((read_log(runs[n]), plumbing.load_checkpoint(os.path.join(runs[n], "ckpt.pt"))) for n in runs)
    assert [r["loss"] for r in lc] == pytest.approx([r["loss"] for r in le], rel=1e-5)
    assert [r["grad_norm"] for r in lc] == pytest.approx([r["grad_norm"] for r in le], rel=1e-4)
    # AdamW's first steps move a weight by about lr whatever its gradient's size, so a gradient near 0 whose sign
    # the rounding flips moves it the other way: a tolerance of lr (2e-3) over the weights' size, not float32's
    assert max_rel_diff(ce["model"], cc["model"]) < 1e-3 and max_rel_diff(ce["ema"], cc["ema"]) < 1e-3
    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/g++",))  # a machine with no compiler
    with pytest.raises(SystemExit, match="--compile: torch.compile cannot compile the model on this machine "
                                         r"\(.*C\+\+ compiler.*\); run without --compile"):
        train.main(["--data", data, "--out-dir", str(tmp_path / "nocxx"), *TRAIN_TINY, "--max-steps", "1",
                    "--compile"])
    torch._dynamo.reset()


@cuda
def test_gpu_train_bf16_compiled(tmp_path):
    data = make_dataset(tmp_path / "data", n=64)
    run_script("train.py", "--data", data, "--out-dir", str(tmp_path / "run"), *TRAIN_TINY, "--max-steps", "4",
               "--precision", "bf16", "--compile")
    log = read_log(str(tmp_path / "run"))
    assert all(np.isfinite(r["loss"]) and r["peak_mem_gb"] > 0 for r in log)


def repa_steps(tmp_path, device, num_steps, compile=False):
    """train.py's step, REPA's teacher included, on tiny shapes (the model compiled as train.py compiles it, or
    eager): returns a function running step s (its inputs, the step and the EMA update); the batches are read and
    pinned beforehand, as the loader's workers do."""
    data_dir = make_dataset(tmp_path / "d", n=16, latent_shape=(4, 16, 16), resolution=128, images=True)
    args = train.get_args(["--data", data_dir, "--out-dir", str(tmp_path / "run"), *TRAIN_TINY, "--patch-size", "2",
                           "--global-batch-size", "8", "--dino", DINO_WEIGHTS, "--repa-layer", "2"])
    args.precision = "bf16" if device.type == "cuda" else "fp32"
    data = train.LatentBatches(data_dir, 8, 0, 1, 0, need_images=True)
    teacher = load_dino(DINO_WEIGHTS).to(device)
    student, ema, opt = train.build(train.model_config(args, data.meta), teacher, args, device)
    model = torch.compile(student) if compile else student
    pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)
    batches = [{k: pin(v) for k, v in data[s].items()} for s in range(num_steps)]

    def step(s):
        inputs = train.step_inputs(batches[s], s, data, teacher, args, device)
        out = train.train_step(model, opt, inputs, args)
        train.update_ema(ema, student.model, train.ema_decay(args, s + 1))
        return out
    return step


@cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_a_training_step_never_waits_for_the_host(tmp_path, compiled):
    step = repa_steps(tmp_path, torch.device("cuda"), 3, compile=compiled)
    step(0)  # the first step makes its one-time tables (the teacher's position table, AdamW's state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any copy to the host or stream synchronization raises
    try:
        outs = [step(1), step(2)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(o).all() for o in outs)


# =============================================================================================
# issue 12: cluster-grade reliability (preemption signals, SIGKILL at random moments, locks, memory, ranks)


def start_script(log, *args):
    """Start one of the scripts in the background (one thread), its output in the file `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env = {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *map(str, args)], cwd=HERE, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_until(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the process ended ({proc.returncode}) before it was signalled"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def finished(proc, log, timeout=120):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # (torchrun passes it on to its workers)
        proc.wait(timeout=60)
        raise
    return proc.returncode, open(log).read()


def tmp_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if ".tmp" in f]


def assert_same_run(a, b):
    ca, cb = (torch.load(os.path.join(r, "ckpt.pt"), weights_only=True) for r in (a, b))
    assert ca["step"] == cb["step"]
    for key in ("model", "ema"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert [r["step"] for r in read_log(a)] == [r["step"] for r in read_log(b)]  # logged once


def test_train_sigterm_stops_after_the_step_and_resumes_bit_identical(tmp_path):
    data = make_dataset(tmp_path / "data", n=64)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = [*TRAIN_TINY, "--max-steps", "200", "--ckpt-every", "1000", "--log-every", "1"]
    train.main(["--data", data, "--out-dir", a, *flags])
    proc = start_script(tmp_path / "log", "train.py", "--data", data, "--out-dir", b, *flags)
    wait_until(lambda: os.path.exists(os.path.join(b, "log.jsonl")) and len(read_log(b)) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # a second signal, most likely during the save: changes nothing
    rc, out = finished(proc, tmp_path / "log")
    step = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["step"]
    assert rc == plumbing.EXIT_STOPPED and "Traceback" not in out, out
    assert f"stopped by SIGTERM at step {step}: rerun the same command to resume" in out
    assert 5 <= step < 200 and not tmp_files(b)  # no checkpoint before: the stop saved it
    train.main(["--data", data, "--out-dir", b, *flags])  # the same command resumes
    assert_same_run(a, b)
    assert [r["loss"] for r in read_log(a)] == [r["loss"] for r in read_log(b)]  # one step per record


def test_train_two_ranks_stop_at_the_same_step(tmp_path):
    # SIGUSR1 to rank 1 only: the flag is reduced across ranks, so rank 0 stops at the same step
    data = make_dataset(tmp_path / "data", n=64)
    run = str(tmp_path / "run")
    driver = tmp_path / "driver.py"
    driver.write_text(f"import json, os, sys\nsys.path.insert(0, {HERE!r})\nimport plumbing, train\n"
                      f"checks = []\nreal = plumbing.stop_requested\n"
                      f"plumbing.stop_requested = lambda *a: checks.append(real(*a)) or checks[-1]\n"
                      f"open(os.path.join({run!r}, 'pid' + os.environ['RANK']), 'w').write(str(os.getpid()))\n"
                      f"try:\n    train.main(sys.argv[1:])\nfinally:\n"
                      f"    open(os.path.join({run!r}, 'steps' + os.environ['RANK']), 'w').write(json.dumps(checks))\n")
    os.makedirs(run)
    proc = start_script(tmp_path / "log", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29523", driver, "--data", data, "--out-dir", run, *TRAIN_TINY, "--max-steps", "3000",
                        "--ckpt-every", "100000", "--log-every", "2")
    wait_until(lambda: os.path.exists(os.path.join(run, "pid1")) and os.path.exists(os.path.join(run, "log.jsonl"))
               and len(read_log(run)) >= 2, proc)
    os.kill(int(open(os.path.join(run, "pid1")).read()), signal.SIGUSR1)
    rc, out = finished(proc, tmp_path / "log")
    assert "exitcode  : 75" in out and 'train.py", line' not in out, out  # torchrun reports the ranks' status 75
    s0, s1 = (json.load(open(os.path.join(run, f"steps{r}"))) for r in (0, 1))
    step = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)["step"]
    assert s0 == s1 == [0] * (step // 2 - 1) + [signal.SIGUSR1]  # checked at the log steps (every 2nd), both
    assert step % 2 == 0  # ranks stop at the same one
    assert f"stopped by SIGUSR1 at step {step}" in out


def test_sample_and_prepare_stop_on_sigterm_keeping_finished_work(tmp_path):
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    proc = start_script(tmp_path / "log", "sample.py", "--ckpt", ckpt, "--num-samples", 400, "--batch-size", 2,
                        "--num-steps", 10, "--npz", tmp_path / "s.npz")
    parts = tmp_path / "s_parts"
    wait_until(lambda: parts.exists() and len(os.listdir(parts)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    rc, out = finished(proc, tmp_path / "log")
    assert rc == plumbing.EXIT_STOPPED and "Traceback" not in out, out
    assert f"stopped by SIGTERM: the finished batches are kept in {parts}" in out
    assert len(os.listdir(parts)) >= 2 and not tmp_files(parts) and not (tmp_path / "s.npz").exists()

    proc = start_script(tmp_path / "log2", "prepare_latents.py", "--toy", "--out", tmp_path / "toy",
                        "--chunk-size", 100, "--batch-size", 10)
    progress = tmp_path / "toy" / ".progress"
    wait_until(lambda: progress.exists() and len(os.listdir(progress)) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    rc, out = finished(proc, tmp_path / "log2")
    assert rc == plumbing.EXIT_STOPPED and "Traceback" not in out, out
    assert "stopped by SIGINT: the finished chunks are kept" in out
    done = os.listdir(progress)
    assert 2 <= len(done) < 50 and not (tmp_path / "toy" / "meta.json").exists()


@pytest.mark.parametrize("script", ["prepare_latents", "train", "sample"])
def test_sigkill_at_random_moments_then_rerun_gives_the_same_output(script, tmp_path):
    """Killed with SIGKILL (nothing of the script runs) three times at random moments of its work, each rerun
    resuming from what the previous one left; the final rerun's output equals an uninterrupted run's.
    prepare_latents encodes the toy set in about a second, faster than any timer's moment can be placed, so its
    moments are measured progress: the kill comes once a random number of chunks is finished (a later kill at a
    larger number); train and sample are killed at a random fraction of an uninterrupted run's time."""
    rng = np.random.default_rng(["prepare_latents", "train", "sample"].index(script))  # reproducible moments
    if script == "prepare_latents":
        started = None
        num_chunks = 5000 // 100
        marks = np.sort(rng.choice(np.arange(3, int(0.7 * num_chunks)), 3, replace=False))  # chunks done at each kill

        def cmd(out):
            return ["prepare_latents.py", "--toy", "--out", out, "--chunk-size", 100, "--batch-size", 25]

        def check(ref, cut):
            assert_same(ref, cut)
            assert not tmp_files(cut) and not os.listdir(os.path.join(cut, ".progress"))[0].endswith(".npz")
    elif script == "train":
        data, started = make_dataset(tmp_path / "data", n=64), "rank(s) x"  # the line before the first step

        def cmd(out):
            return ["train.py", "--data", data, "--out-dir", out, *TRAIN_TINY, "--max-steps", 200, "--ckpt-every", 9,
                    "--log-every", 50]

        def check(ref, cut):
            assert_same_run(ref, cut)
            assert not tmp_files(cut)
    else:
        ckpt, started = save_tiny_ckpt(tmp_path / "ckpt.pt"), "sampling on 1 rank(s)"

        def cmd(out):
            return ["sample.py", "--ckpt", ckpt, "--num-samples", 48, "--batch-size", 4, "--num-steps", 12,
                    "--cfg-scale", 2.0, "--npz", out + ".npz"]

        def check(ref, cut):
            with np.load(ref + ".npz") as a, np.load(cut + ".npz") as b:
                assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
            assert not os.path.exists(cut + "_parts")

    def run(out, log, kill_now=None):
        """Run the script to its end (the seconds it worked, from `started`), or SIGKILL it once kill_now(t0)
        holds, t0 the moment `started` was printed (None before): then None."""
        proc, t0 = start_script(log, *cmd(out)), None
        while proc.poll() is None:
            if t0 is None and started is not None and started in open(log).read():
                t0 = time.time()
            if kill_now is not None and kill_now(t0):
                proc.kill()  # SIGKILL
                proc.wait()
                return None
            time.sleep(0.005)
        assert proc.returncode == 0, open(log).read()
        return time.time() - (t0 or time.time())

    def chunks_done(out, n):  # prepare_latents: kill once n chunks are finished
        progress = os.path.join(out, ".progress")
        return lambda t0: os.path.isdir(progress) and sum(f.endswith(".done") for f in os.listdir(progress)) >= n

    def seconds_worked(seconds):  # train, sample: kill `seconds` after the work began
        return lambda t0: t0 is not None and time.time() - t0 >= seconds

    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    work = run(ref, tmp_path / "log_ref")
    killed = [run(cut, tmp_path / f"log{k}", chunks_done(cut, marks[k]) if started is None else
                  seconds_worked(rng.uniform(0.05, 0.35) * work)) is None for k in range(3)]
    assert sum(killed) >= 2  # (one may finish first)
    run(cut, tmp_path / "log_last")
    check(ref, cut)


def test_second_train_on_a_held_out_dir_is_refused(tmp_path):
    data = make_dataset(tmp_path / "data", n=32)
    run = tmp_path / "run"
    run.mkdir()
    holder = hold_lock(run / "train.lock")  # what a live run holds
    try:
        with pytest.raises(SystemExit, match=f"--out-dir {run} is in use by a live train.py run"):
            train.main(["--data", data, "--out-dir", str(run), *TRAIN_TINY, "--max-steps", "1"])
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "ckpt.pt").exists()
    train.main(["--data", data, "--out-dir", str(run), *TRAIN_TINY, "--max-steps", "1"])  # released: runs
    assert (run / "ckpt.pt").exists()


def test_resume_survives_a_torn_log_line_and_a_missing_samples_folder(tmp_path):
    data = make_dataset(tmp_path / "data", n=32)
    run = str(tmp_path / "run")
    train.main(["--data", data, "--out-dir", run, *TRAIN_TINY, "--max-steps", "2"])
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 0.')  # a crash in the middle of a write
    shutil.rmtree(os.path.join(run, "samples"))
    train.main(["--data", data, "--out-dir", run, *TRAIN_TINY, "--max-steps", "3", "--sample-every", "3",
                "--sample-steps", "2"])
    assert [r["step"] for r in read_log(run)] == [1, 2, 3]
    assert os.path.isfile(os.path.join(run, "samples", "0000003.png"))


def test_atomic_write_removes_its_temporary_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"the last good checkpoint")
    with pytest.raises(OSError, match="No space left"):
        with plumbing.atomic_write(str(path)) as f:
            f.write(b"half of a checkpoint")
            raise OSError(28, "No space left on device")  # what a full disk raises
    assert os.listdir(tmp_path) == ["ckpt.pt"] and path.read_bytes() == b"the last good checkpoint"


def test_process_group_timeout_allows_long_checkpoint_writes(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(k, v)
    plumbing.setup_dist()
    assert seen["timeout"] == plumbing.DIST_TIMEOUT and plumbing.DIST_TIMEOUT.total_seconds() >= 30 * 60


def test_tf32_on_a_gpu_unless_float32_is_asked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU is touched without torchrun
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    for tf32, matmul in ((True, "high"), (False, "highest")):
        torch.set_float32_matmul_precision("medium")  # what a user's session may have set: restored afterwards
        assert plumbing.setup_dist(tf32=tf32)[3] == torch.device("cuda:0")
        assert torch.get_float32_matmul_precision() == matmul and torch.backends.cudnn.allow_tf32 == tf32
        plumbing.cleanup_dist()
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32 == before[1]
    torch.set_float32_matmul_precision(before[0])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from Linux's /proc")
def test_sampling_maps_the_checkpoint_and_skips_the_optimizer(tmp_path):
    # a checkpoint with 400 MB of optimizer state: sampling from it must not read that into memory
    model = tiny_model(in_channels=3, num_classes=4)
    sd = model.state_dict()
    ckpt = {"config": asdict(model.cfg), "model": sd, "ema": sd, "step": 0,
            "optimizer": {"state": {0: {"exp_avg": torch.ones(100_000_000)}}, "param_groups": []},
            "data": {"scaling_factor": 1.0, "vae": "none", "latent_shape": [3, 8, 8], "num_classes": 4}}
    plumbing.save_atomic(ckpt, str(tmp_path / "ckpt.pt"))
    del ckpt
    driver = ("import sys; sys.path.insert(0, sys.argv[1]); import sample\n"
              "def peak():  # this process's peak resident memory, kB (ru_maxrss would count the parent's)\n"
              "    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
              "before = peak()\n"
              "sample.main(sys.argv[2:])\n"
              "print('peak growth MB', (peak() - before) / 1024)\n")
    out = run_script("-c", driver, HERE, "--ckpt", str(tmp_path / "ckpt.pt"), "--num-samples", "1", "--num-steps", "2",
                     "--out", str(tmp_path / "g.png")).stdout
    assert float(out.split("peak growth MB")[1]) < 150, out


def test_sample_warns_when_vae_differs_from_the_checkpoints(tmp_path, monkeypatch, capsys):
    ckpt = save_tiny_ckpt(tmp_path / "latent.pt", in_channels=4, vae=VAE_TINY, scaling=0.18215)
    shutil.copytree(VAE_TINY, tmp_path / "other_vae")
    base = ["--ckpt", ckpt, "--num-steps", 2, "--num-samples", 1, "--out", tmp_path / "g.png"]
    cli(monkeypatch, *base, "--vae", VAE_TINY)
    assert "warning" not in capsys.readouterr().err
    cli(monkeypatch, *base, "--vae", tmp_path / "other_vae")
    assert f"warning: --vae {tmp_path / 'other_vae'} is not the VAE that '{ckpt}' was trained with" in \
        capsys.readouterr().err


def test_sample_ranks_that_read_different_weights_refuse(tmp_path):
    # the checkpoint rewritten between the ranks' loads: rank 1 reads other weights; both ranks stop, no parts mix
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    other = tmp_path / "other.pt"
    sd = torch.load(ckpt, weights_only=True)
    sd["ema"] = {k: v + 1 for k, v in sd["ema"].items()}
    plumbing.save_atomic(sd, str(other))
    driver = tmp_path / "driver.py"
    driver.write_text(f"import os, sys\nsys.path.insert(0, {HERE!r})\nimport pretrained, sample\n"
                      f"real = pretrained.load_checkpoint\n"
                      f"if os.environ['RANK'] == '1':\n"
                      f"    pretrained.load_checkpoint = lambda path, *a: real({str(other)!r}, *a)\n"
                      f"sample.main(sys.argv[1:])\n")
    r = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29524", str(driver),
                   "--ckpt", ckpt, "--num-samples", "4", "--num-steps", "2", "--npz", str(tmp_path / "s.npz"),
                   env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}, check=False, timeout=120)
    assert r.returncode != 0 and "the ranks read different weights" in r.stderr + r.stdout
    assert 'sample.py", line' not in r.stderr and not (tmp_path / "s.npz").exists()  # (torchrun's own report aside)


def test_two_ranks_of_prepare_latents_never_write_the_same_file(tmp_path):
    # every file (so every filesystem page) that prepare_latents.py writes has one writer; rank 0 alone writes
    # the shared arrays, the other rank's chunks go through files of their own
    make_folder(tmp_path / "data")
    log = tmp_path / "writes"
    driver = tmp_path / "driver.py"
    driver.write_text(f"import builtins, os, sys\nsys.path.insert(0, {HERE!r})\nimport prepare_latents\n"
                      f"fd = os.open({str(log)!r} + os.environ['RANK'], os.O_WRONLY | os.O_CREAT | os.O_APPEND)\n"
                      f"real_open, real_replace = builtins.open, os.replace\n"
                      f"def logged_open(file, mode='r', *a, **k):\n"
                      f"    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in 'wa+'):\n"
                      f"        os.write(fd, (os.path.abspath(file) + '\\n').encode())\n"
                      f"    return real_open(file, mode, *a, **k)\n"
                      f"def logged_replace(src, dst):\n"
                      f"    os.write(fd, (os.path.abspath(dst) + '\\n').encode())\n"
                      f"    return real_replace(src, dst)\n"
                      f"builtins.open, os.replace = logged_open, logged_replace\n"
                      f"prepare_latents.main(sys.argv[1:])\n")
    args = ["--data-path", str(tmp_path / "data"), "--vae", "none", "--resolution", "16", "--images", "--flip",
            "--chunk-size", "2", "--batch-size", "2", "--num-workers", "0"]
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29525", str(driver), *args,
               "--out", str(tmp_path / "two"), env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    w0, w1 = (set(open(f"{log}{r}").read().split()) for r in (0, 1))
    assert not w0 & w1, w0 & w1
    assert os.path.join(str(tmp_path / "two"), "latents.npy") in w0
    assert any(f.endswith(".npz") for f in w1)  # rank 1 did write its chunks
    run_script("prepare_latents.py", *args, "--out", str(tmp_path / "one"))
    assert_same(tmp_path / "one", tmp_path / "two")


@cuda
def test_gpu_resumes_a_cpu_checkpoint_with_fused_adamw(tmp_path):
    data = make_dataset(tmp_path / "data", n=64)
    run = str(tmp_path / "run")
    run_script("train.py", "--data", data, "--out-dir", run, *TRAIN_TINY, "--max-steps", "2",
               env={"CUDA_VISIBLE_DEVICES": ""})  # saved on the CPU (AdamW not fused)
    train.main(["--data", data, "--out-dir", run, *TRAIN_TINY, "--max-steps", "4", "--precision", "fp32"])  # fused
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["optimizer"]["param_groups"][0]["fused"]


# =============================================================================================
# issue 19: reliability, second round (prepare_latents across ranks, evaluate.py on real-size inputs, locks)


def hold_lock(path):
    """Another process holding the lock that plumbing.lock_file takes on `path` (a POSIX record lock), as a live run
    does; kill it to let go."""
    code = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.lockf(f, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def start_ranks(tmp_path, name, driver, *args):
    """Two ranks started by hand, as srun starts them (no torchrun to end the others when one exits): a list of
    (process, log file)."""
    import socket
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ranks = []
    for r in range(2):
        log = tmp_path / f"{name}{r}.log"
        with open(log, "w") as f:
            ranks.append((subprocess.Popen([sys.executable, str(driver), *map(str, args)], cwd=HERE, stdout=f,
                                           stderr=subprocess.STDOUT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}),
                          log))
    return ranks


def end_all(ranks):
    for proc, _ in ranks:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def prepare_driver(tmp_path, patch=""):
    """A driver running prepare_latents.main after `patch` (Python; `rank` is set), writing its pid to TMP/pidRANK."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"import os, sys, time\nsys.path.insert(0, {HERE!r})\nimport prepare_latents\n"
                      f"rank = os.environ['RANK']\n{patch}\n"
                      f"open(os.path.join({str(tmp_path)!r}, 'pid' + rank), 'w').write(str(os.getpid()))\n"
                      f"prepare_latents.main(sys.argv[1:])\n")
    return driver


def test_prepare_latents_a_rank_stopped_or_killed_ends_every_rank(tmp_path, monkeypatch):
    # SIGUSR1 to rank 1 alone: both ranks stop after the same batch, with status 75 (rank 0 used to poll forever
    # for rank 1's chunks); then rank 1 killed outright: rank 0 ends too; a rerun finishes what both left
    slow = "encode = prepare_latents.encode_batch\n" \
           "prepare_latents.encode_batch = lambda *a, **k: time.sleep(0.1) or encode(*a, **k)\n"
    driver = prepare_driver(tmp_path, slow)
    out, progress = tmp_path / "toy", tmp_path / "toy" / ".progress"
    args = ["--toy", "--out", out, "--chunk-size", 100, "--batch-size", 50]
    for name, sig in (("stop", signal.SIGUSR1), ("kill", signal.SIGKILL)):
        for f in ("pid0", "pid1"):
            (tmp_path / f).unlink(missing_ok=True)
        before = len(os.listdir(progress)) if progress.exists() else 0
        ranks = start_ranks(tmp_path, name, driver, *args)
        try:
            wait_until(lambda: (tmp_path / "pid1").exists() and progress.exists()
                       and len(os.listdir(progress)) >= before + 2, ranks[0][0])
            os.kill(int((tmp_path / "pid1").read_text()), sig)
            (rc0, out0), (rc1, out1) = (finished(proc, log, timeout=60) for proc, log in ranks)
        finally:
            end_all(ranks)
        if sig == signal.SIGUSR1:
            assert rc0 == rc1 == plumbing.EXIT_STOPPED and "Traceback" not in out0 + out1, out0 + out1
            assert "stopped by SIGUSR1: the finished chunks are kept" in out0
        else:
            assert rc1 == -signal.SIGKILL and rc0 not in (0, plumbing.EXIT_STOPPED), out0  # ended, not left waiting
        assert not (out / "meta.json").exists() and len(os.listdir(progress)) < 50
    run_prepare(monkeypatch, *args)  # one process resumes what the two ranks left
    run_prepare(monkeypatch, *args[:2], tmp_path / "ref", *args[3:])
    assert_same(tmp_path / "ref", out)


def test_prepare_latents_rank_0_waits_for_other_ranks_chunks_a_bounded_time(tmp_path, monkeypatch):
    # rank 0 of two, whose rank 1 wrote nothing: once the ranks are done (here: at once), rank 0 gives up after
    # PART_WAIT naming the missing chunks (it used to poll until a signal came, here after 10 s)
    monkeypatch.setattr(plumbing, "PART_WAIT", 0.5)
    data = [(i, torch.full((8, 8, 3), i, dtype=torch.uint8), "") for i in range(8)]
    settings = {"format_version": 1, "source": "test", "count": 8, "files_sha1": "", "vae": "none",
                "vae_precision": "fp32", "resolution": 8, "flip": False, "images": False, "chunk_size": 2}
    import threading
    received = []
    timer = threading.Timer(10, received.append, [signal.SIGTERM])
    timer.start()
    try:
        with pytest.raises(SystemExit, match=r"chunk\(s\) \[1, 3\] of the other ranks are still not in .* 0.5 s after"):
            writer = prepare_latents.DatasetWriter(str(tmp_path / "out"), settings, None, received, "cpu")
            writer.world = 2  # rank 0 of two, without a process group
            writer.write(data, np.zeros(8, np.int64), ["a"], num_workers=0)
    finally:
        timer.cancel()
    assert not received


def test_prepare_latents_ranks_follow_rank_0s_listing_and_decision(tmp_path, monkeypatch):
    # rank 1's view of the filesystem lags: it misses one image and, later, the finished dataset's meta.json.
    # Rank 0 lists and decides for both, so the result is one process's, and the rerun ends on both ranks.
    make_folder(tmp_path / "data")
    lag = "if rank == '1':\n" \
          "    walk, exists = os.walk, os.path.exists\n" \
          "    os.walk = lambda *a, **k: ((d, ds, [f for f in fs if f != 'a.png']) for d, ds, fs in walk(*a, **k))\n" \
          "    os.path.exists = lambda p: not str(p).endswith('meta.json') and exists(p)\n"
    driver = prepare_driver(tmp_path, lag)
    args = ["--data-path", tmp_path / "data", "--vae", "none", "--resolution", 16, "--images", "--chunk-size", 2,
            "--batch-size", 2, "--num-workers", 0]
    for name in ("first", "again"):
        ranks = start_ranks(tmp_path, name, driver, *args, "--out", tmp_path / "two")
        try:
            results = [finished(proc, log, timeout=120) for proc, log in ranks]
        finally:
            end_all(ranks)
        assert [rc for rc, _ in results] == [0, 0], results
    assert "already holds this dataset, complete; nothing to do" in results[0][1]
    run_prepare(monkeypatch, *args, "--out", tmp_path / "one")
    assert_same(tmp_path / "one", tmp_path / "two")


def test_prepare_latents_rerun_of_a_stopped_overwrite_resumes(tmp_path, monkeypatch, capsys):
    # the stop message says "rerun the same command"; with --overwrite in it, the rerun used to start again
    make_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--data-path", tmp_path / "data", "--vae", "none", "--resolution", 16, "--chunk-size", 2, "--batch-size",
            2, "--num-workers", 0, "--out", out, "--overwrite"]
    run_prepare(monkeypatch, *args[:-3], "--out", tmp_path / "ref")
    encode, calls = prepare_latents.encode_batch, []

    def counted(*a, **k):  # the shape probe, then one call per batch = per chunk; the 3rd: a SIGUSR1 arrives
        calls.append(1)
        if len(calls) == 3 and stopping:
            os.kill(os.getpid(), signal.SIGUSR1)
        return encode(*a, **k)

    monkeypatch.setattr(prepare_latents, "encode_batch", counted)
    stopping = False
    run_prepare(monkeypatch, *args[:-1])  # a finished dataset
    stopping, calls[:] = True, []
    with pytest.raises(SystemExit) as e:  # --overwrite redoes it, and is stopped halfway
        run_prepare(monkeypatch, *args)
    assert e.value.code == plumbing.EXIT_STOPPED and len(os.listdir(out / ".progress")) == 2
    assert "stopped by SIGUSR1: the finished chunks are kept" in capsys.readouterr().out
    stopping, calls[:] = False, []
    run_prepare(monkeypatch, *args)  # the same command resumes: the probe and the 2 chunks left
    assert len(calls) == 3 and "resuming it (2 of 4 chunks left)" in capsys.readouterr().out
    assert_same(tmp_path / "ref", out)
    calls.clear()
    run_prepare(monkeypatch, *args)  # finished: --overwrite redoes it
    assert len(calls) == 5


def test_prepare_latents_killed_while_creating_its_files_then_rerun_recovers(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--data-path", tmp_path / "data", "--vae", "none", "--resolution", 16, "--images", "--num-workers", 0]
    run_prepare(monkeypatch, *args, "--out", tmp_path / "ref")
    for module, name, n, extra in ((np.lib.format, "open_memmap", 2, []),  # making the arrays of a new dataset
                                   (os, "remove", 3, ["--resolution", 16, "--overwrite"])):  # an --overwrite's clearing
        real, calls = getattr(module, name), []

        def dying(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt  # where a SIGKILL could land: nothing of ours runs after it
            return real(*a, **k)

        monkeypatch.setattr(module, name, dying)
        with pytest.raises(KeyboardInterrupt):
            run_prepare(monkeypatch, *args, *extra, "--out", out)
        monkeypatch.setattr(module, name, real)
        assert not (out / "settings.json").exists()
        run_prepare(monkeypatch, *args, "--out", out)  # the same command without --overwrite: recovers
        assert_same(tmp_path / "ref", out)


def children(pid):
    """The pids of the processes whose parent is `pid` (from Linux's /proc)."""
    found = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:  # ended meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the fields after "(command)": state, parent, ...
            found.append(int(d))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the DataLoader workers in Linux's /proc")
def test_train_lock_is_free_right_after_a_sigkill_though_its_workers_live_on(tmp_path):
    # DataLoader workers forked after the lock was taken: killed with SIGKILL, the main process leaves them behind
    # for a few seconds (here: stopped, as long as the test likes); they must not hold the lock
    data = make_dataset(tmp_path / "data", n=64)
    run = tmp_path / "run"
    proc = start_script(tmp_path / "log", "train.py", "--data", data, "--out-dir", run, *TRAIN_TINY,
                        "--max-steps", 100000, "--ckpt-every", 100000, "--num-workers", 2)
    workers = []
    try:
        wait_until(lambda: (run / "log.jsonl").exists() and len(read_log(str(run))) >= 1, proc)
        workers = children(proc.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        proc.kill()
        proc.wait()
        assert all(os.path.exists(f"/proc/{pid}") for pid in workers)  # alive, holding what they inherited
        lock = plumbing.lock_run_dir(str(run), "train.py", ())  # the rerun's lock, at once (it used to be "in use by a live run")
        assert lock is not None
        plumbing.unlock(lock)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_second_sample_on_the_same_npz_is_refused(tmp_path, monkeypatch):
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    npz, parts = tmp_path / "s.npz", tmp_path / "s_parts"
    parts.mkdir()
    in_flight = parts / "0000000_0000004_0123456789.npz.tmp999999"  # the live run's part being written
    in_flight.write_bytes(b"half a part")
    argv = ["--ckpt", ckpt, "--num-samples", 4, "--num-steps", 2, "--npz", npz]
    holder = hold_lock(f"{npz}.lock")
    try:
        with pytest.raises(SystemExit, match=f"--npz {npz} is in use by a live sample.py run"):
            cli(monkeypatch, *argv)
        assert in_flight.exists()  # (it used to be deleted as a killed run's leftover)
    finally:
        holder.kill()
        holder.wait()
    cli(monkeypatch, *argv)  # the other run gone: this one runs, removes the leftover, and its lock file at the end
    assert npz.exists() and not in_flight.exists() and not os.path.exists(f"{npz}.lock")


class StubInception(torch.nn.Module):
    """The Inception network's interface at small sizes, fast: pool (B, 64), spatial (B, 48), logits (B, 8),
    a fixed projection of the pixels, offset by 1000 (as ill-conditioned as a variance gets for the sums)."""

    def __init__(self, pixels):
        super().__init__()
        self.proj = torch.nn.Linear(pixels, 120)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.constant_(self.proj.bias, 1000.0)

    def forward(self, x):  # uint8 (B, 3, H, W)
        return self.proj(x.float().flatten(1) / 255).split([64, 48, 8], dim=1)


class StubDino(StubInception):
    pos_rule, embed_dim = "hub", 64
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (pretrained.IMAGENET_MEAN, pretrained.IMAGENET_STD))

    def tokens(self, x):  # (B, 3, 224, 224) -> (B, 1, 64)
        return self.proj(F.interpolate(x, size=(8, 8), mode="area").flatten(1))[:, None, :64]


def test_make_ref_streams_its_statistics_in_flat_memory_reading_each_image_once(tmp_path, monkeypatch):
    import tracemalloc
    stub = StubInception(8 * 8 * 3)
    images = random_images(8192, 8, seed=4)
    peaks = {}
    for n in (2048, 8192):
        np.savez(tmp_path / f"src{n}.npz", arr_0=images[:n])
        tracemalloc.start()
        arrays = evaluate.make_ref(str(tmp_path / f"src{n}.npz"), str(tmp_path / f"ref{n}.npz"), stub, num_images=16)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # the numpy memory it held at its peak does not grow with the images: 4 x more images, < 32 bytes more per
    # added image (the row lists); holding the features (64 + 48 + 8 floats an image) and np.cov's float64 copies,
    # as it did, took ~1 KB per image
    assert peaks[8192] - peaks[2048] < 32 * 6144, peaks
    pool, spatial, _ = evaluate.inception_features(stub, images)
    for key, feats in (("", pool), ("_s", spatial)):  # np.cov's numbers, despite the offset of 1000
        mu, sigma = np.mean(feats.astype(np.float64), 0), np.cov(feats, rowvar=False)
        assert np.allclose(arrays["mu" + key], mu, rtol=1e-12) and np.allclose(arrays["sigma" + key], sigma, rtol=1e-8)
    keep = np.sort(np.random.default_rng(0).choice(8192, 16, replace=False))
    assert np.array_equal(arrays["arr_0"], images[keep])
    # an image folder with --dino: each file is read once (it used to be three times: Inception, DINOv2, arr_0)
    (tmp_path / "folder").mkdir()
    for i, im in enumerate(images[:6]):
        Image.fromarray(im).save(tmp_path / "folder" / f"{i}.png")
    opened, real_open = [], evaluate.Image.open
    monkeypatch.setattr(evaluate.Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    arrays = evaluate.make_ref(str(tmp_path / "folder"), str(tmp_path / "f.npz"), stub, StubDino(8 * 8 * 3),
                               resolution=8, num_images=4)
    assert sorted(opened) == sorted(str(tmp_path / "folder" / f"{i}.png") for i in range(6))
    assert arrays["mu_dinov2"].shape == (64,) and arrays["arr_0"].shape == (4, 8, 8, 3)


def test_make_ref_refuses_an_unfinished_or_imageless_dataset(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    base = ["--data-path", tmp_path / "data", "--vae", "none", "--resolution", 16, "--num-workers", 0]
    run_prepare(monkeypatch, *base, "--out", tmp_path / "no_images")
    run_prepare(monkeypatch, *base, "--images", "--out", tmp_path / "cut")
    os.remove(tmp_path / "cut" / "meta.json")  # as a stopped run leaves it
    stub = StubInception(16 * 16 * 3)
    with pytest.raises(ValueError, match="cut: a prepare_latents.py dataset without meta.json, so unfinished"):
        evaluate.make_ref(str(tmp_path / "cut"), str(tmp_path / "r.npz"), stub)
    with pytest.raises(ValueError, match="no_images: this prepare_latents.py dataset has no images .* --images"):
        evaluate.make_ref(str(tmp_path / "no_images"), str(tmp_path / "r.npz"), stub)


def test_evaluate_bad_input_is_refused_before_any_feature(tmp_path, monkeypatch, capsys, inception_file):
    def no_features(*a):
        raise AssertionError("a feature was computed")
    monkeypatch.setattr(evaluate, "inception_batch", no_features)
    monkeypatch.setattr(evaluate, "dino_batch", no_features)
    good = random_images(4, 16)
    np.savez(tmp_path / "ref.npz", arr_0=good)
    np.savez(tmp_path / "empty.npz", arr_0=good[:0])
    np.savez(tmp_path / "three.npz", arr_0=good[:3])
    np.savez(tmp_path / "bad_mu.npz", arr_0=good, mu=np.zeros(10), sigma=np.eye(10), mu_s=np.zeros(3),
             sigma_s=np.eye(3))
    np.savez(tmp_path / "bad_dino.npz", arr_0=good, mu_dinov2=np.zeros(768), sigma_dinov2=np.eye(768))
    np.savez(tmp_path / "nan_dino.npz", arr_0=good, mu_dinov2=np.zeros(64), sigma_dinov2=np.full((64, 64), np.nan))
    for ref, samples, match in (("ref", "empty", "empty.npz has 0 images"), ("three", "ref", "three.npz has 3 images"),
                                ("ref", "bad_mu", r"bad_mu.npz: mu is \(10,\), but the 2048-d features of Inception"),
                                ("bad_dino", "ref", r"bad_dino.npz: mu_dinov2 is \(768,\), but the 64-d features of "
                                                    r"the --dino network need \(64,\)"),
                                ("nan_dino", "ref", "nan_dino.npz: sigma_dinov2 is not finite")):
        with pytest.raises(ValueError, match=match):
            evaluate.evaluate(str(tmp_path / f"{ref}.npz"), str(tmp_path / f"{samples}.npz"), None, StubDino(8))
    with pytest.raises(ValueError, match=r"--resolution 32: .*ref.npz holds 16x16 images"):
        evaluate.make_ref(str(tmp_path / "ref.npz"), str(tmp_path / "r.npz"), None, resolution=32)
    # the command line: outputs' folders and flags before the weights are even loaded (there are none here)
    for argv, match in ((["--make-ref", tmp_path / "ref.npz", "--out", tmp_path / "no" / "r.npz"], "--out .*no/r.npz: folder"),
                        ([tmp_path / "ref.npz", tmp_path / "ref.npz", "--json", tmp_path / "no" / "m.json"], "--json .*: folder"),
                        (["--make-ref", tmp_path / "ref.npz", "--out", tmp_path / "r.npz", "--num-images", 2],
                         "--num-images: must be at least 4"),
                        ([tmp_path / "ref.npz", tmp_path / "ref.npz", "--resolution", 64],
                         "--resolution goes with --make-ref")):
        with pytest.raises(SystemExit, match=match):
            evaluate_cli(monkeypatch, *argv, "--inception", tmp_path / "none.pth")
    # DINOv2 weights other than ViT-L/14: a warning; a killed --make-ref's temporary file goes; one run per --out
    (tmp_path / "r.npz.tmp99999").write_bytes(b"what a killed --make-ref left")
    with pytest.raises(SystemExit, match="three.npz has 3 images"):
        evaluate_cli(monkeypatch, "--make-ref", tmp_path / "three.npz", "--out", tmp_path / "r.npz", "--inception",
                     inception_file, "--dino", DINO_WEIGHTS)
    assert "not the ViT-L/14 (1024, 24) that FD_DINOv2 is defined on" in capsys.readouterr().err
    assert not (tmp_path / "r.npz.tmp99999").exists() and not (tmp_path / "r.npz.lock").exists()
    holder = hold_lock(tmp_path / "r.npz.lock")
    try:
        with pytest.raises(SystemExit, match="--out .*r.npz is in use by a live evaluate.py --make-ref run"):
            evaluate_cli(monkeypatch, "--make-ref", tmp_path / "ref.npz", "--out", tmp_path / "r.npz", "--inception",
                         inception_file)
    finally:
        holder.kill()
        holder.wait()


def test_pairwise_distances_checks_finite_after_the_clamp_as_tf():
    # |u|^2 = 32761 fits float16, 2 u.v = 65522 does not: -inf, which TF's max with 0 turns into 0 before its
    # is_finite check, so the block stays float16 (it used to switch to float32: 32364.1 instead of 32368)
    U, V = torch.tensor([[181.0, 0.0]]), torch.tensor([[181.0, 0.0], [1.1, 0.3]])
    d = evaluate.pairwise_distances(U, V)
    assert d.tolist() == [[0.0, 32368.0]]



# =============================================================================================
# evaluate.py (issue 11): the ADM evaluator's metrics and FD_DINOv2


def random_inception_state_dict(seed=0):
    """Seeded random weights for the Inception network that keep its activations O(1); the same function made
    testdata/inception_torch_fidelity_io.pt."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in evaluate.InceptionV3().state_dict().items():
        if k.endswith("conv.weight"):  # He init keeps the activations O(1) through the ReLUs
            sd[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith(("bn.weight", "bn.running_var")):
            sd[k] = 1 + 0.1 * torch.rand(v.shape, generator=g)
        elif k.endswith(("bn.bias", "bn.running_mean")):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.startswith("fc."):
            sd[k] = torch.randn(v.shape, generator=g) / 2048 ** 0.5
    return sd


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's layout: the converted weights only, no num_batches_tracked."""
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(0), path)
    return str(path)


@pytest.fixture(scope="module")
def inception(inception_file):
    return evaluate.load_inception(inception_file)


def random_images(n, h, w=None, seed=0):
    """Smooth-ish uint8 images (N, H, W, 3): a gradient plus noise, different per image."""
    rng = np.random.default_rng(seed)
    w = w or h
    base = np.linspace(0, 255, h * w).reshape(1, h, w, 1) * rng.uniform(0.2, 1, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 50, (n, h, w, 3)), 0, 255).astype(np.uint8)


def test_inception_both_layouts_load_strict(tmp_path, inception_file, inception):
    # pytorch-fid's file is a torchvision Inception3 state dict: the same names plus num_batches_tracked
    sd = random_inception_state_dict(0)
    torchvision_sd = {**sd, **{k.replace("running_mean", "num_batches_tracked"): torch.tensor(0)
                               for k in sd if k.endswith("running_mean")}}
    torch.save(torchvision_sd, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    other = evaluate.load_inception(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))
    assert not other.training and all(not p.requires_grad for p in other.parameters())
    images = random_images(2, 24)
    for a, b in zip(evaluate.inception_features(inception, images), evaluate.inception_features(other, images)):
        assert np.array_equal(a, b)
    # anything else: a clear error naming the file and the keys
    for bad, match in (({k: v for k, v in sd.items() if k != "fc.weight"}, "missing.*fc.weight"),
                       ({**sd, "AuxLogits.fc.weight": torch.zeros(1)}, "unexpected.*AuxLogits"),
                       ({**sd, "fc.weight": torch.zeros(1000, 2048)}, "shapes.*fc.weight"),
                       ([torch.zeros(1)], "not a state dict")):
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match=match) as e:
            evaluate.load_inception(str(tmp_path / "bad.pth"))
        assert "bad.pth" in str(e.value)
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        evaluate.load_inception(str(tmp_path / "nope.pth"))


def test_inception_matches_torch_fidelity(inception):
    g = torch.load(f"{TESTDATA}/inception_torch_fidelity_io.pt", weights_only=True)
    for name in ("square", "wide"):  # 32 x 32 and 20 x 45 images, resized to 299 x 299
        pool, spatial, logits = evaluate.inception_features(inception, g[f"{name}_images"].numpy(), batch_size=2)
        assert pool.shape == (len(pool), 2048) and spatial.shape == (len(pool), 2023) and logits.shape[1] == 1008
        assert rel_err(torch.from_numpy(pool), g[f"{name}_pool"]) < 1e-5  # measured: 0 (two CPUs)
        assert rel_err(torch.from_numpy(logits), g[f"{name}_logits"]) < 1e-5  # measured: 6e-8, 1.3e-7


def test_inception_spatial_is_mixed_6d_1x1_in_tf_order(inception):
    seen = []
    handle = inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            _, spatial, _ = inception(torch.from_numpy(random_images(2, 16)).permute(0, 3, 1, 2))
    finally:
        handle.remove()
    conv = seen[0]  # (B, 192, 17, 17), after batch norm and ReLU
    assert conv.shape == (2, 192, 17, 17)
    assert torch.equal(spatial.view(2, 17, 17, 7), conv[:, :7].permute(0, 2, 3, 1))  # (row, column, channel)


def test_resize_is_tf1_bilinear():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).view(1, 1, 2, 2)
    # source coordinates i * 2 / 3 = 0, 2/3, 4/3; the last clamps to the edge pixel
    expected = torch.tensor([[0, 20 / 3, 10], [40 / 3, 20, 70 / 3], [20, 80 / 3, 30]])
    assert torch.allclose(evaluate.resize_bilinear_tf1(x, 3)[0, 0], expected, atol=1e-5)
    assert not torch.allclose(F.interpolate(x, size=(3, 3), mode="bilinear")[0, 0], expected, atol=0.1)
    x = torch.arange(8.0).view(1, 1, 2, 4)  # non-square: columns read at 0, 4/3, 8/3
    assert torch.allclose(evaluate.resize_bilinear_tf1(x, 3)[0, 0, 0], torch.tensor([0, 4 / 3, 8 / 3]), atol=1e-5)
    x = torch.rand(2, 3, 5, 5)
    assert torch.equal(evaluate.resize_bilinear_tf1(x, 5), x)


def test_frechet_distance_closed_form_and_float64_reference():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()  # diagonal covariances
    assert abs(evaluate.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) / expected - 1) < 1e-12
    # full covariances against tr sqrtm(s1 s2) from the eigenvalues of the (non-symmetric) product itself
    a, b = rng.normal(size=(40, 40)), rng.normal(size=(40, 40))
    c1, c2 = a @ a.T / 40, b @ b.T / 40 + 0.1 * np.eye(40)
    m1, m2 = rng.normal(size=40), rng.normal(size=40)
    tr = np.sqrt(np.linalg.eigvals(c1 @ c2).astype(complex)).real.sum()
    ref = (m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * tr
    assert abs(evaluate.frechet_distance(m1, c1, m2, c2) / ref - 1) < 1e-9
    assert abs(evaluate.frechet_distance(m1, c1, m1, c1)) < 1e-9 * np.trace(c1)
    with pytest.raises(ValueError, match="Imaginary component"):  # not a covariance: sqrtm is complex, as in ADM
        evaluate.frechet_distance(mu1[:2], np.eye(2), mu2[:2], np.diag([1.0, -0.01]))
    with pytest.raises(ValueError, match="not finite"):
        evaluate.frechet_distance(mu1, np.diag(s1), mu2 * np.nan, np.diag(s2))
    with pytest.raises(ValueError, match="different sizes"):
        evaluate.frechet_distance(mu1, np.diag(s1), mu2[:5], np.diag(s2[:5]))


def test_statistics_match_adm_evaluator():
    g = np.load(f"{TESTDATA}/adm_evaluator_stats.npz")  # ADM's own functions on these features (see its note)

    def fid(a, b):
        return evaluate.frechet_distance(*evaluate.feature_statistics(g[a]), *evaluate.feature_statistics(g[b]))
    assert abs(fid("sample_pool", "ref_pool") / g["fid"] - 1) < 1e-7  # measured: 1.5e-8
    assert abs(fid("sample_spatial", "ref_spatial") / g["sfid"] - 1) < 1e-7
    assert abs(evaluate.inception_score(g["sample_logits"], split_size=100) / g["is_split100"] - 1) < 1e-9
    assert abs(evaluate.inception_score(g["sample_logits"]) / g["is_split5000"] - 1) < 1e-9
    for key, scale, block in (("prec_recall", 1, 10000), ("prec_recall_block100", 1, 100), ("prec_recall_big", 60, 10000)):
        pr = evaluate.precision_recall(scale * g["ref_pool"], scale * g["sample_pool"], block=block)
        assert np.abs(np.array(pr) - g[key]).max() < 1e-9, key  # counts of images: equal


def test_inception_score_known_answers():
    onehot = 50 * np.eye(10, dtype=np.float32)  # confident predictions
    assert abs(evaluate.inception_score(np.tile(onehot, (3, 1))) - 10) < 1e-3  # 10 classes, evenly: IS = 10
    assert abs(evaluate.inception_score(np.tile(onehot[:1], (30, 1))) - 1) < 1e-6  # one class: IS = 1
    assert abs(evaluate.inception_score(np.zeros((30, 10), np.float32)) - 1) < 1e-6  # uniform p(y|x): IS = 1
    # splits of 10 images, each split holding 5 classes evenly: IS = 5 (over all 20 images at once it is 10)
    logits = np.concatenate([np.tile(onehot[:5], (2, 1)), np.tile(onehot[5:], (2, 1))])
    assert abs(evaluate.inception_score(logits, split_size=10) - 5) < 1e-3
    assert abs(evaluate.inception_score(logits) - 10) < 1e-3


def test_pairwise_distances_float16_and_float32_fallback():
    rng = np.random.default_rng(0)
    u, v = torch.from_numpy(rng.normal(size=(5, 8))).float(), torch.from_numpy(rng.normal(size=(4, 8))).float()
    exact = torch.cdist(u.double(), v.double()) ** 2
    d = evaluate.pairwise_distances(u, v)
    assert d.dtype == torch.float32 and torch.equal(d, d.half().float())  # float16 values
    assert 1e-5 < (d - exact).abs().max() < 0.02  # float16 rounding, not float32
    d = evaluate.pairwise_distances(300 * u, 300 * v)  # squared norms past float16's 65504: the float32 path
    assert torch.isfinite(d).all() and ((d - 9e4 * exact).abs() / (9e4 * exact)).max() < 1e-4


def test_precision_recall_known_answers():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 8, size=(40, 4)).astype(np.float32)  # small integers: exact in float16
    assert evaluate.precision_recall(ref, ref) == (1.0, 1.0)
    assert evaluate.precision_recall(ref, ref + 1000) == (0.0, 0.0)
    # 30 reference points plus 10 far away: precision 30/40
    samples = np.concatenate([ref[:30], ref[:10] + 1000])
    assert evaluate.precision_recall(ref, samples)[0] == 0.75
    # radii: the 3rd nearest neighbour other than the point itself, against a brute force
    d = ((ref[:, None].astype(np.float64) - ref[None]) ** 2).sum(-1)
    radii = evaluate.manifold_radii(torch.from_numpy(ref), k=3, block=16)
    assert np.array_equal(radii.numpy(), np.sort(d, axis=1)[:, 3])


def test_open_images_memmaps_arr_0(tmp_path):
    images = random_images(3, 8, 6)
    np.savez(tmp_path / "a.npz", arr_1=np.arange(3), arr_0=images)
    loaded = evaluate.open_images(str(tmp_path / "a.npz"))
    assert isinstance(loaded, np.memmap) and np.array_equal(loaded, images)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)  # compressed: read whole
    assert np.array_equal(evaluate.open_images(str(tmp_path / "c.npz")), images)


def evaluate_cli(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, argv)])
    evaluate.main()


def test_cli_end_to_end(tmp_path, monkeypatch, capsys, inception_file, inception):
    ref, samples = random_images(5, 24, seed=1), random_images(4, 24, seed=2)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.zeros(4, dtype=np.int64))
    calls = []  # frechet_distance's arguments and results (tested on its own above; 2048-d eigh are slow here)
    frechet = evaluate.frechet_distance
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *a: calls.append((a, frechet(*a))) or calls[-1][1])
    evaluate_cli(monkeypatch, tmp_path / "ref.npz", tmp_path / "samples.npz", "--inception", inception_file,
                 "--batch-size", 3, "--json", tmp_path / "m.json")
    out = capsys.readouterr()
    names = [line.split(":")[0] for line in out.out.splitlines() if ": " in line]
    assert names == ["Inception Score", "FID", "sFID", "Precision", "Recall"]  # ADM's order
    assert "fewer than one Inception Score split" in out.err
    got = json.load(open(tmp_path / "m.json"))
    # the same features and statistics from the Python API: samples first, as ADM calls it
    r, s = evaluate.inception_features(inception, ref), evaluate.inception_features(inception, samples)
    assert got["Inception Score"] == evaluate.inception_score(s[2])
    for (args, value), key, i in zip(calls, ("FID", "sFID"), (0, 1)):
        expected = evaluate.feature_statistics(s[i]) + evaluate.feature_statistics(r[i])
        assert all(np.array_equal(a, b) for a, b in zip(args, expected)) and got[key] == value
    assert [got["Precision"], got["Recall"]] == list(evaluate.precision_recall(r[0], s[0]))
    assert got["FID"] > 0 and got["sFID"] > 0 and 1 <= got["Inception Score"]


def test_make_ref_round_trip(tmp_path, monkeypatch, capsys, inception_file, inception):
    folder = tmp_path / "val" / "class_a"
    folder.mkdir(parents=True)
    full = random_images(5, 30, 40, seed=3)
    for i, im in enumerate(full):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    evaluate_cli(monkeypatch, "--make-ref", tmp_path / "val", "--out", tmp_path / "ref.npz", "--inception",
                 inception_file, "--resolution", 24, "--num-images", 4, "--seed", 1)
    crops = np.stack([center_crop_arr(Image.fromarray(im), 24) for im in full])
    with np.load(tmp_path / "ref.npz") as f:
        ref = dict(f)
    keep = np.sort(np.random.default_rng(1).choice(5, 4, replace=False))
    assert np.array_equal(ref["arr_0"], crops[keep])  # a seeded subset, in order
    pool, spatial, _ = evaluate.inception_features(inception, crops)  # statistics over all 5 images
    for (mu, sigma), key in ((evaluate.feature_statistics(pool), ""), (evaluate.feature_statistics(spatial), "_s")):
        assert np.allclose(ref["mu" + key], mu, rtol=1e-5) and np.allclose(ref["sigma" + key], sigma, rtol=1e-4, atol=1e-7)
    # evaluating all 5 crops against it: the stored statistics are used, so FID and sFID are 0 up to rounding
    # (~1e-5 of the trace: 5 images make a rank-4 covariance in 2048 dimensions, whose ~2000 zero eigenvalues
    # come out as rounding noise and then go through a square root; with more images than features it is at rounding level)
    np.savez(tmp_path / "all.npz", arr_0=crops)
    evaluate_cli(monkeypatch, tmp_path / "ref.npz", tmp_path / "all.npz", "--inception", inception_file,
                 "--json", tmp_path / "m.json")
    got = json.load(open(tmp_path / "m.json"))
    assert abs(got["FID"]) < 1e-4 * np.trace(ref["sigma"]) and abs(got["sFID"]) < 1e-4 * np.trace(ref["sigma_s"])
    # a prepare_latents.py dataset with --images: its valid images only
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "images.npy", np.concatenate([crops, crops[:1] * 0]))
    np.save(data / "valid.npy", np.array([True] * 5 + [False]))
    (data / "meta.json").write_text(json.dumps({"has_images": True}))  # a finished dataset
    evaluate_cli(monkeypatch, "--make-ref", data, "--out", tmp_path / "ref2.npz", "--inception", inception_file,
                 "--num-images", 4, "--seed", 1)
    with np.load(tmp_path / "ref2.npz") as f:
        assert np.array_equal(f["arr_0"], crops[keep]) and np.allclose(f["mu"], ref["mu"], rtol=1e-5)


def test_cli_bad_inputs(tmp_path, monkeypatch, inception_file):
    good = random_images(4, 16)
    np.savez(tmp_path / "ref.npz", arr_0=good)
    np.savez(tmp_path / "noarr.npz", images=good)
    np.savez(tmp_path / "small.npz", arr_0=good[:, :8, :8])
    np.savez(tmp_path / "mu_only.npz", arr_0=good, mu=np.zeros(2048), sigma=np.eye(2))  # checked before use
    np.savez(tmp_path / "same.npz", arr_0=np.repeat(good[:1], 4, axis=0))
    np.savez(tmp_path / "three.npz", arr_0=good[:3])
    np.savez(tmp_path / "float.npz", arr_0=good.astype(np.float32))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    sd = random_inception_state_dict(0)
    sd["Conv2d_1a_3x3.bn.running_mean"][0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    cases = [(("ref.npz", "noarr.npz"), "noarr.npz has no arr_0"),
             (("ref.npz", "small.npz"), "small.npz holds 8x8 images.*16x16"),
             (("ref.npz", "float.npz"), "float.npz: arr_0 is float32"),
             (("ref.npz", "junk.npz"), "junk.npz is not a readable .npz"),
             (("ref.npz", "missing.npz"), "missing.npz: no such file"),
             (("mu_only.npz", "ref.npz"), "mu_only.npz has mu, sigma but not mu_s, sigma_s"),
             (("ref.npz", "same.npz"), "all 4 images of .*same.npz give the same Inception features"),
             (("ref.npz", "three.npz"), "three.npz has 3 images"),
             (("ref.npz", "ref.npz", "nan.pth"), "Inception features of .*ref.npz are not finite")]
    for files, match in cases:
        weights = str(tmp_path / files[2]) if len(files) > 2 else inception_file
        with pytest.raises(SystemExit, match=match):
            evaluate_cli(monkeypatch, tmp_path / files[0], tmp_path / files[1], "--inception", weights)
    with pytest.raises(SystemExit, match="nope.pth: no such file"):
        evaluate_cli(monkeypatch, tmp_path / "ref.npz", tmp_path / "ref.npz", "--inception", tmp_path / "nope.pth")
    with pytest.raises(SystemExit, match="no images"):
        (tmp_path / "empty").mkdir()
        evaluate_cli(monkeypatch, "--make-ref", tmp_path / "empty", "--out", tmp_path / "r.npz", "--inception",
                     inception_file)


def test_dino_hub_rule_and_fd_features_match_official():
    g = torch.load(f"{TESTDATA}/dinov2_tiny_fd_io.pt", weights_only=True)  # official DINOv2 + EDM2 (its note)
    hub = load_dino(DINO_WEIGHTS, pos_rule="hub")
    assert rel_err(torch.from_numpy(evaluate.dino_features(hub, g["images"].numpy(), batch_size=2)), g["features"]) < 1e-5
    repa = load_dino(DINO_WEIGHTS)  # REPA's rule: another position table at a 16 x 16 grid
    assert not torch.allclose(repa.pos_embed_for(16, 16), hub.pos_embed_for(16, 16), atol=1e-3)
    assert torch.equal(repa.pos_embed_for(37, 37), hub.pos_embed_for(37, 37))  # the native grid: no resampling
    with pytest.raises(ValueError, match="pos_rule='hub'"):
        evaluate.dino_features(repa, g["images"].numpy())
    with pytest.raises(ValueError, match="pos_rule"):
        DINOv2(128, 1, pos_rule="antialias")


def test_dino_token_stream_float32_under_autocast(dino):
    # as the official model: the float32 class token and position table keep the residual stream in float32
    dtypes = []
    handle = dino.blocks[0].register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = dino.tokens(torch.randn(1, 3, 112, 112))
    finally:
        handle.remove()
    assert dtypes == [torch.float32] and tokens.dtype == torch.float32


def test_cli_fd_dinov2(tmp_path, monkeypatch, capsys, inception_file):
    frechet = evaluate.frechet_distance  # FID and sFID are tested above: skip their 2048-d eigh here, keep FD_DINOv2's
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *a: 0.0 if len(a[0]) > 128 else frechet(*a))
    ref, samples = random_images(5, 24, seed=1), random_images(4, 24, seed=2)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    evaluate_cli(monkeypatch, tmp_path / "ref.npz", tmp_path / "samples.npz", "--inception", inception_file,
                 "--dino", DINO_WEIGHTS, "--json", tmp_path / "m.json")
    assert capsys.readouterr().out.splitlines()[-1].startswith("FD_DINOv2: ")  # after ADM's five
    hub = load_dino(DINO_WEIGHTS, pos_rule="hub")
    expected = frechet(*evaluate.feature_statistics(evaluate.dino_features(hub, samples)),
                       *evaluate.feature_statistics(evaluate.dino_features(hub, ref)))
    assert json.load(open(tmp_path / "m.json"))["FD_DINOv2"] == pytest.approx(expected, rel=1e-9)
    # --make-ref --dino stores the DINOv2 statistics; evaluating against it uses them
    evaluate_cli(monkeypatch, "--make-ref", tmp_path / "ref.npz", "--out", tmp_path / "ref_d.npz", "--inception",
                 inception_file, "--dino", DINO_WEIGHTS)
    with np.load(tmp_path / "ref_d.npz") as f:
        assert f["mu_dinov2"].shape == (128,) and f["sigma_dinov2"].shape == (128, 128)
        assert np.array_equal(f["arr_0"], ref)  # 5 images, fewer than --num-images: all kept
    evaluate_cli(monkeypatch, tmp_path / "ref_d.npz", tmp_path / "samples.npz", "--inception", inception_file,
                 "--dino", DINO_WEIGHTS, "--json", tmp_path / "m2.json")
    assert json.load(open(tmp_path / "m2.json"))["FD_DINOv2"] == pytest.approx(expected, rel=1e-6)


@cuda
def test_gpu_inception_and_precision_recall_match_cpu(inception):
    images = random_images(4, 32)
    cpu = evaluate.inception_features(inception, images)
    try:
        gpu = evaluate.inception_features(inception.to("cuda"), images)
    finally:
        inception.to("cpu")  # the fixture is shared with the other tests
    for a, b in zip(cpu, gpu):
        assert rel_err(torch.from_numpy(b), torch.from_numpy(a)) < 1e-4  # TF32 off: float32 as on the CPU
    g = np.load(f"{TESTDATA}/adm_evaluator_stats.npz")
    pr = evaluate.precision_recall(g["ref_pool"], g["sample_pool"], device="cuda")
    assert np.abs(np.array(pr) - g["prec_recall"]).max() <= 0.005


# =============================================================================================
# issue 12 item 7a (the cosine calibration over both guidance halves) and item 5 (the cache key)


def calibration_run(model, N, B, w, interval, shape=(4, 8, 8)):
    """The unshared sampler written out, both halves at every step: (x_i list, z_i list (2B, N, D), t, x_N)."""
    noise, y = calibration_batch(model, B, shape)
    t = sample.timesteps(N)
    y2 = torch.cat([y, torch.full_like(y, model.cfg.num_classes)])
    x, xs, zs = noise, [], []
    for i in range(N):
        v, z, _ = model(torch.cat([x, x]), t[i].repeat(2 * B), y2)
        xs.append(x)
        zs.append(z)
        v_cond, v_null = v.chunk(2)
        v = v_null + w * (v_cond - v_null) if interval[0] < t[i] < interval[1] else v_cond
        x = x + v * (t[i + 1] - t[i])
    return xs, zs, t, x


def test_cosine_cost_averages_both_guidance_halves_as_released():
    model, N, B = tiny_model(), 6, 2
    with torch.no_grad():
        model.y_embedder.embedding_table.weight.mul_(50)  # std 1: the halves' z differ clearly
    record = []
    euler(model, torch.randn(B, 4, 8, 8), torch.tensor([0, 1]), N, both_halves=True,
          watch=lambda i, n, z: record.append(z))
    assert len(record) == N and all(z.shape == (2 * B, 16, 32) for z in record)
    for w in (1.0, 3.0):  # without guidance too: the released sharing_dp always runs both halves
        with torch.no_grad():
            _, zs, _, _ = calibration_run(model, N, B, w, (0.3, 1.0))
        zn = F.normalize(torch.stack(zs).double(), dim=-1)  # (N, 2B, tokens, D)
        direct = 1 - torch.einsum("ibnd,jbnd->ij", zn, zn).numpy() / (2 * B * zn.shape[2])
        cond_only = 1 - torch.einsum("ibnd,jbnd->ij", zn[:, :B], zn[:, :B]).numpy() / (B * zn.shape[2])
        cost = sample.measure_sharing_cost(model, sample.Sampler(N, cfg_scale=w), (4, 8, 8), batch_size=B)
        assert np.allclose(cost, direct, atol=1e-6)
        assert np.abs(cost - cond_only).max() > 1e-3  # the test tells the halves apart


def test_sharing_schedule_cache_key(tmp_path, monkeypatch, capsys):
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    model = pretrained.load_ddt(ckpt)
    calls, real = [], sample.measure_sharing_cost
    monkeypatch.setattr(sample, "measure_sharing_cost",
                        lambda model, sampler, *a, **k: calls.append(sampler.cfg_scale) or real(model, sampler, *a, **k))
    args = argparse.Namespace(ckpt=ckpt, encoder_steps=3, sharing="dp", precision="fp32")

    def schedule(sharing, precision, cfg_scale=2.0, m=model):
        args.sharing, args.precision = sharing, precision
        return sample.sharing_schedule(args, sample.Sampler(6, cfg_scale=cfg_scale), m, (3, 8, 8), [str(tmp_path)])

    fp32_dp = schedule("dp", "fp32")
    schedule("dp", "bf16")  # a new entry: measured
    schedule("dp", "fp32", 3.0)  # another guidance scale: measured
    assert calls == [2.0, 2.0, 3.0]
    capsys.readouterr()
    assert schedule("dp", "fp32") == fp32_dp and len(calls) == 3 and "cached" in capsys.readouterr().out
    assert schedule("uniform", "fp32") == sample.uniform_schedule(6, 3) and len(calls) == 3  # not cached
    keys = [json.loads(k) for k in json.load(open(ckpt + ".sharing.json"))]
    assert sorted((k["sharing"], k["precision"], k["device"], k["sampler"]["cfg_scale"]) for k in keys) == [
        ("dp", "bf16", "cpu", 2.0), ("dp", "fp32", "cpu", 2.0), ("dp", "fp32", "cpu", 3.0)]
    monkeypatch.setattr(sample, "measure_sharing_cost", lambda *a, **k: np.zeros((6, 6)))  # no CUDA needed
    schedule("dp", "fp32", m=copy.deepcopy(model).to("meta"))  # another device type: not the CPU's entry
    assert len(json.load(open(ckpt + ".sharing.json"))) == 4


def test_sharing_table_compares_the_schedules(capsys):
    model = tiny_model()
    samplers.sharing_table([model], (4, 8, 8), torch.device("cpu"), "fp32", 6, [2, 3], 2, 2.0, repeats=1)
    rows = table_rows(capsys.readouterr().out)
    assert [(r[0], r[1]) for r in rows] == [("2", "dp"), ("2", "uniform"), ("3", "dp"), ("3", "uniform")]
    cost = sample.measure_sharing_cost(model, sample.Sampler(6, cfg_scale=2.0), (4, 8, 8))
    noise = sample_noise(1000, range(2), (4, 8, 8))
    ref = euler(model, noise, torch.tensor([0, 5]), 6, 2.0)
    for k, name, c, dev, worst, *_ in rows:
        steps = sample.solve_sharing(cost, int(k)) if name == "dp" else sample.uniform_schedule(6, int(k))
        x = euler(model, noise, torch.tensor([0, 5]), 6, 2.0, encoder_steps=steps)
        err = ((x - ref) ** 2).flatten(1).mean(1)  # per image, written out
        assert float(c) == pytest.approx(sample.sharing_cost(cost, steps), abs=1e-4)
        assert float(dev) == pytest.approx((err.mean() / (ref ** 2).mean()).sqrt().item(), abs=1e-4)
        assert float(worst) == pytest.approx((err / (ref ** 2).flatten(1).mean(1)).sqrt().max().item(), abs=1e-4)


# =============================================================================================
# experiments/: the paper in miniature (issues 17, 25) and the quality measure (issue 26)


def hand_made_results(curves):
    """study's result dicts from {name: per-seed value lists at steps 100..400}; the first one is the iDiT."""
    return [dict(name=name, decoder_depth=0 if i == 0 else 2, params=1e6, gflops=0.01,
                 curves={str(s): list(zip([100, 200, 300, 400], v)) for s, v in enumerate(values)})
            for i, (name, values) in enumerate(curves.items())]


def test_study_speedup_curve_and_tail_on_a_hand_made_curve():
    assert study.steps_to_reach([100, 200, 300, 400], [1.0, 0.8, 0.6, 0.5], 0.7) == pytest.approx(250)  # linear
    assert study.steps_to_reach([100, 200], [1.0, 0.8], 1.2) == 100  # already there at the first evaluation
    assert study.steps_to_reach([100, 200], [1.0, 0.8], 0.5) == math.inf  # never
    # the split reaches the iDiT's loss at T = 200 (0.8) at 150, at T = 300 (0.7) at 200, at T = 400 (0.6) at 250
    curve = study.speedup_curve([100, 200, 300, 400], [1.0, 0.8, 0.7, 0.6], [0.9, 0.7, 0.5, 0.4])
    assert curve == [(100, 100, 1.0), (200, pytest.approx(150), pytest.approx(4 / 3)),
                     (300, 200, 1.5), (400, 250, 1.6)]  # a ratio that grows with the run: not settled
    assert study.tail_change([100, 200, 300, 400, 500], [1.0, 0.8, 0.7, 0.6, 0.5]) == pytest.approx(0.2)
    assert study.tail_change([100, 200, 300, 400, 500], [1.0, 0.8, 0.7, 0.6, 0.6]) == 0  # flat
    results = hand_made_results({"iDiT": [[1.0, 0.8, 0.7, 0.6], [1.0, 0.8, 0.7, 0.6]],
                                 "4En2De": [[0.9, 0.7, 0.5, 0.4], [0.9, 0.7, 0.5, 0.4]],
                                 "2En4De": [[1.1, 1.0, 0.9, 0.8], [1.1, 0.9, 0.9, 0.7]]})
    base = study.summarize(results)
    assert base["name"] == "iDiT" and base["steps_to_base"] == 400 and base["speedup"] == 1
    assert results[1]["steps_to_base"] == 250 and results[1]["speedup"] == 1.6
    assert results[2]["steps_to_base"] == math.inf and results[2]["final_mean"] == pytest.approx(0.75)
    assert results[2]["final_std"] == pytest.approx(np.std([0.8, 0.7], ddof=1))
    rows = study.tables(results, base).splitlines()
    assert "| 4En2De |" in rows[3] and "| 250 | 1.60x |" in rows[3] and "| not reached | - |" in rows[4]
    matched = [r for r in rows if r.startswith("| 4En2De | 0.")]
    assert matched == ["| 4En2De | 0.9000 (1.00x) | 0.7000 (1.33x) | 0.5000 (1.50x) | 0.4000 (1.60x) |"]
    never = [r for r in rows if r.startswith("| 2En4De | 1.1")]  # never reaches the iDiT's 0.7 or 0.6: (-)
    assert never == ["| 2En4De | 1.1000 (0.60x) | 0.9500 (0.55x) | 0.9000 (-) | 0.7500 (-) |"]
    assert math.isnan(results[2]["speedup_curve"][-1][2]) and math.isnan(results[2]["speedup"])


def test_welch_p_values_match_known_ones():
    assert study.betainc(2.5, 0.5, 5 / 9) == pytest.approx(0.1019395, abs=1e-6)  # t = 2, 5 df: scipy's 0.10194
    assert study.betainc(1, 1, 0.3) == pytest.approx(0.3)  # the uniform distribution
    # scipy.stats.ttest_ind(a, b, equal_var=False).pvalue, computed once
    assert study.welch([1, 2, 3], [2, 3, 4.5]) == pytest.approx(0.280287, abs=1e-5)
    assert study.welch([0.50, 0.52, 0.51], [0.60, 0.59, 0.61]) == pytest.approx(0.000385068, rel=1e-5)
    assert math.isnan(study.welch([1.0], [2.0, 3.0])) and math.isnan(study.welch([1, 1], [1, 1]))
    assert study.fmt_p(0.21) == "0.21 (indistinguishable)" and study.fmt_p(0.004) == "0.004"


def test_study_refuses_a_width_below_the_patch():
    with pytest.raises(SystemExit, match="below the 48 numbers of a patch .*16-dimensional subspace"):
        study.check_width(DDTConfig(in_channels=3, patch_size=4, hidden_size=16, num_heads=2))
    study.check_width(DDTConfig(in_channels=3, patch_size=2, hidden_size=12, num_heads=3))  # 12 = C p^2: allowed


def test_quality_measure_known_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "train_classifier", lambda x, y, k, seed=0, real=quality.train_classifier:
                        real(x, y, k, steps=60, seed=seed))
    data = make_dataset(tmp_path / "data", n=64, latent_shape=(3, 8, 8))
    val = make_dataset(tmp_path / "val", n=48, latent_shape=(3, 8, 8), seed=1)
    scorer = quality.Scorer(str(tmp_path / "clf.pt"), data, val)
    xv, yv = quality.read_images(val)
    same = scorer.score(xv, yv)
    assert abs(same["fd"]) < 1e-6 and same["agreement"] == scorer.floor["val_accuracy"]  # identical sets: 0
    shifted = scorer.score(xv + 0.5, yv)
    assert shifted["fd"] > 1e-3  # a shifted set: more
    assert scorer.score(xv + 1.0, yv)["fd"] > shifted["fd"]
    again = quality.Scorer(str(tmp_path / "clf.pt"), data, val)  # read back from the file, not retrained
    assert again.score(xv + 0.5, yv) == shifted
    with pytest.raises(SystemExit, match="is a classifier of"):
        quality.Scorer(str(tmp_path / "clf.pt"), val, data)


def study_argv(tmp_path, *extra):
    data, val = make_dataset(tmp_path / "data", n=32), make_dataset(tmp_path / "val", n=16, seed=1)
    return ["--data", data, "--val-data", val, "--model", "DDT-S/2", "--hidden-size", "48", "--num-heads", "2",
            "--patch-size", "4", "--depth", "2", "--encoder-depths", "2", "1", "--seeds", "0", "1", "--steps", "4",
            "--val-every", "1", "--ckpt-every", "2", "--batch-size", "8", "--num-samples", "0", *extra]


def test_study_runs_every_configuration_and_seed_and_resumes_without_retraining(tmp_path, monkeypatch):
    argv = study_argv(tmp_path, "--out-dir", str(tmp_path / "study"))
    calls, real_main = [], train.main

    def interrupted(argv):  # the third run is stopped (as by SIGTERM) before it finishes
        calls.append(argv)
        if len(calls) == 3:
            raise SystemExit(plumbing.EXIT_STOPPED)
        return real_main(argv)

    monkeypatch.setattr(train, "main", interrupted)
    with pytest.raises(SystemExit):
        study.main(argv)
    calls.clear()
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv) or real_main(argv))
    results = study.main(argv)
    assert [c[c.index("--out-dir") + 1].rsplit(os.sep, 1)[1] for c in calls] == ["iDiT_seed1", "1En1De_seed1"]
    assert [r["name"] for r in results] == ["iDiT", "1En1De"] and [r["decoder_depth"] for r in results] == [0, 1]
    for r in results:  # every curve: the val loss of the EMA model at steps 1..4, as logged by train.py
        assert set(r["curves"]) == {"0", "1"} and all([s for s, _ in c] == [1, 2, 3, 4] for c in r["curves"].values())
        log = read_log(str(tmp_path / "study" / "runs" / f"{r['name']}_seed1"))
        assert r["curves"]["1"][-1][1] == [rec["val_loss_ema"] for rec in log if "val_loss_ema" in rec][-1]
    saved = json.load(open(tmp_path / "study" / "study.json"))
    assert saved["results"][1]["curves"] == {k: [list(p) for p in c] for k, c in results[1]["curves"].items()}
    assert saved["significance"][0][:2] == ["iDiT", "1En1De"]
    md = open(tmp_path / "study" / "study.md").read()
    assert "| iDiT |" in md and "| 1En1De |" in md and "over 2 seeds" in md and "Welch" in md
    calls.clear()
    study.main(argv)  # all finished: nothing is trained again
    assert calls == []


def test_study_stopped_by_a_signal_mid_run_then_rerun_gives_the_same_json(tmp_path):
    argv = study_argv(tmp_path)
    driver = tmp_path / "driver.py"  # the study, sending itself SIGTERM after the 2nd of the 2nd run's 4 steps
    driver.write_text(f"import os, signal, sys\nsys.path.insert(0, {HERE!r})\nimport train\n"
                      f"from experiments import study\nreal, n = train.update_ema, [0]\n"
                      f"def ema(*a):\n    real(*a)\n    n[0] += 1\n"
                      f"    if n[0] == int(os.environ.get('STOP_AT', 0)):\n        os.kill(os.getpid(), signal.SIGTERM)\n"
                      f"train.update_ema = ema\nstudy.main(sys.argv[1:])\n")

    def study_run(out):
        return start_script(tmp_path / f"{out}.log", driver, *argv, "--out-dir", tmp_path / out).wait(timeout=300)

    assert study_run("whole") == 0
    os.environ["STOP_AT"] = "6"
    try:
        assert study_run("stopped") == plumbing.EXIT_STOPPED
    finally:
        os.environ.pop("STOP_AT")
    log = tmp_path / "stopped" / "runs" / "1En1De_seed0" / "log.jsonl"
    assert [json.loads(line)["step"] for line in open(log)][-1] == 2  # stopped in the middle of the 2nd run
    assert not (tmp_path / "stopped" / "study.json").exists()
    assert study_run("stopped") == 0
    assert "resumed" in open(tmp_path / "stopped.log").read()
    whole, stopped = (json.load(open(tmp_path / d / "study.json")) for d in ("whole", "stopped"))
    assert whole == stopped


def test_study_with_sample_quality_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "train_classifier", lambda x, y, k, seed=0, real=quality.train_classifier:
                        real(x, y, k, steps=30, seed=seed))
    argv = study_argv(tmp_path, "--out-dir", str(tmp_path / "s"))
    argv[argv.index("--num-samples") + 1] = "12"
    results = study.main([*argv, "--sample-steps", "3"])
    for r in results:
        assert len(r["fd"]) == 2 and all(0 <= a <= 100 for a in r["agreement"])
    model = pretrained.load_ddt(str(tmp_path / "s" / "runs" / "1En1De_seed1" / "ckpt.pt"))  # one score, written out
    x, y = quality.draw(model, (3, 8, 8), 12, sample.Sampler(3, 2))
    assert results[1]["quality"]["1"] == quality.Scorer(str(tmp_path / "s" / "classifier.pt"), argv[1],
                                                        argv[3]).score(x, y)
    md = open(tmp_path / "s" / "study.md").read()
    assert "Fréchet distance" in md and "| real training images |" in md
    assert "wrote" in capsys.readouterr().out


def test_quality_frontier_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "train_classifier", lambda x, y, k, seed=0, real=quality.train_classifier:
                        real(x, y, k, steps=30, seed=seed))
    data = make_dataset(tmp_path / "data", n=32, num_classes=4)
    val = make_dataset(tmp_path / "val", n=16, num_classes=4, seed=1)
    a, b = save_tiny_ckpt(tmp_path / "a.pt"), save_tiny_ckpt(tmp_path / "b.pt")
    out = tmp_path / "q"
    argv = ["--quality", str(out), "--ckpt", a, b, "--train-data", data, "--val-data", val, "--num-steps", "4",
            "--num-samples", "8", "--repeats", "0"]
    draws, real_draw = [], quality.draw
    monkeypatch.setattr(quality, "draw", lambda *a, **k: draws.append(a) or real_draw(*a, **k))
    samplers.main(argv)
    res = json.load(open(out / "quality.json"))
    for p, solver in itertools.product((a, b), samplers.QUALITY_SOLVERS):  # a schedule is sampled once
        steps = [res["entries"][f"{p}|{solver}|4|{n}|{k}"]["steps"] for n, k in samplers.quality_settings(4)]
        assert steps[3] == steps[4] == [0] and res["entries"][f"{p}|{solver}|4|dp|1"] == \
            res["entries"][f"{p}|{solver}|4|uniform|1"]
    schedules = {(k.rsplit("|", 3)[0], json.dumps(e["steps"])) for k, e in res["entries"].items()}
    assert len(draws) == len(schedules) < len(res["entries"])
    settings = [("unshared", 4), ("dp", 2), ("uniform", 2), ("dp", 1), ("uniform", 1)]  # K = 2, 1.4 -> 1, 0.8 -> 1
    assert samplers.quality_settings(4) == settings
    assert len(res["entries"]) == 2 * 2 * len(settings) and res["times"] == {}
    e = res["entries"][f"{a}|Adams-2|4|uniform|2"]
    scorer = quality.Scorer(str(out / "classifier.pt"), data, val)
    x, y = quality.draw(pretrained.load_ddt(a), (3, 8, 8), 8, sample.Sampler(4, 2), encoder_steps=[0, 2])
    assert e["steps"] == [0, 2] and {k: e[k] for k in ("fd", "agreement")} == scorer.score(x, y)
    assert e["blocks"] == 2 * 2 + 1 * 4  # E = 2 at 2 steps, D = 1 at 4, no guidance
    rows = table_rows(open(out / "quality.md").read())
    assert len(rows) == 2 * len(settings) + 1 and rows[-1][0] == "real images (floor)"
    mtime = os.path.getmtime(out / "quality.json")
    with pytest.raises(SystemExit, match="holds samples drawn with"):
        samplers.main([*argv, "--cfg-scale", "2.0"])
    samplers.main([*argv[:-1], "1"])  # resumed: every entry is there, only the times are measured
    res2 = json.load(open(out / "quality.json"))
    assert res2["entries"] == res["entries"] and len(res2["times"]) == 2 * len(settings)
    assert os.path.getmtime(out / "quality.json") > mtime
    rows = table_rows(open(out / "quality.md").read())
    assert all(r[-1].endswith(" ms") for r in rows[:-1])
    dp = [r for r in rows if r[2] == "dp"]  # on how many models the DP's schedule is the uniform one
    for r in dp:
        same = sum(res["entries"][f"{p}|{r[0]}|4|dp|{r[3]}"]["steps"] == sample.uniform_schedule(4, int(r[3]))
                   for p in (a, b))
        assert r[8] == f"{same} of 2"


# =============================================================================================
# what a newcomer trips on (issue 27)


def test_study_without_matplotlib_says_no_figure_loudly(tmp_path, monkeypatch, capsys):
    real_import = __import__
    monkeypatch.setattr("builtins.__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real_import(name, *a, **k))
    study.main(study_argv(tmp_path, "--out-dir", str(tmp_path / "s")))
    out = capsys.readouterr().out
    assert "NO FIGURE: matplotlib is not installed" in out and out.rstrip().endswith("NO FIGURE (see above)")
    assert not (tmp_path / "s" / "study.png").exists() and (tmp_path / "s" / "study.md").exists()


def test_sample_summary_speaks_plainly(tmp_path, monkeypatch, capsys):
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    cli(monkeypatch, "--ckpt", ckpt, "--num-samples", 4, "--num-steps", 5, "--out", tmp_path / "a.png")
    out = capsys.readouterr().out
    assert re.search(r"^sampled 4 images, 5 steps each, in [0-9.]+ s \([0-9.]+ images/s\)$", out, re.M), out
    assert "encoder sharing" not in out and "K" not in out.replace("OK", "")
    cli(monkeypatch, "--ckpt", ckpt, "--num-samples", 4, "--num-steps", 5, "--encoder-steps", 2, "--sharing",
        "uniform", "--out", tmp_path / "b.png")
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("encoder sharing")]
    assert line == ["encoder sharing: the encoder ran at 2 of the 5 steps, 8 passes over one image against the "
                    "decoder's 20 (a guided step makes two passes: with and without the class)"]


def test_training_and_sampling_grids_share_one_layout_with_whole_names(tmp_path):
    names = ["red_disk", "blue_square", "green_triangle", "checkerboard"]
    images = np.zeros((8, 8, 8, 3), np.uint8)
    plumbing.save_grid(str(tmp_path / "g.png"), images, [3, 0, 3, 0, 3, 0, 3, 0], names)
    img = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    margin = img.shape[1] - 4 * 66  # 4 images per row, 64 px each and 2 px between
    assert img.shape[0] == 2 * 66  # a row per class: checkerboard first (its first image comes first), then red_disk
    font = ImageFont.load_default()
    assert margin == 8 + round(font.getlength("checkerboard"))  # the longest name shown fits whole
    ink = np.flatnonzero((img[:, :margin] < 128).any(0))
    assert ink.max() < margin - 2  # nothing drawn into the images
    assert (img[:66, :margin] < 128).any() and (img[66:, :margin] < 128).any()  # one label per row
    # train.py's grid: the same routine, 8 images of each class in its own row
    model, meta = tiny_model(in_channels=3, num_classes=4), {"num_classes": 4, "latent_shape": [3, 8, 8],
                                                               "class_names": names, "scaling_factor": 1.0}
    sample.class_grid(model, None, meta, str(tmp_path / "t.png"), seed=0, num_steps=2)
    W, H = Image.open(tmp_path / "t.png").size
    assert H == 4 * 66 and W == 8 + round(font.getlength("green_triangle")) + 8 * 66  # its longest name


def test_train_log_line_tells_the_time_left(tmp_path):
    data = make_dataset(tmp_path / "data", n=32)
    run = str(tmp_path / "run")
    train.main(["--data", data, "--out-dir", run, *TRAIN_TINY, "--max-steps", "4", "--log-every", "2"])
    recs = [r for r in read_log(run) if "loss" in r]
    assert [r["step"] for r in recs] == [2, 4] and recs[-1]["time_left"] == "0s"
    assert re.fullmatch(r"\d+s|\d+m\d\ds", recs[0]["time_left"])
    assert plumbing.duration(42.4) == "42s" and plumbing.duration(432) == "7m12s" and plumbing.duration(3900) == "1h05m"


# =============================================================================================
# bad numbers and unwritable outputs: refused at start-up, in one line naming the flag, nothing made or lost

READ_ONLY = "/proc/nanoddt"  # a folder no one can write in (/proc takes no new files), root included


def bad_input_cases(tmp_path):
    """(script's main, argv, what the message must name) for each bad input; the inputs are good otherwise."""
    ckpt, data = save_tiny_ckpt(tmp_path / "ckpt.pt"), make_dataset(tmp_path / "data", n=32)
    released = save_tiny_ckpt(tmp_path / "released.ckpt", released=True)
    toy = ["--toy", "--out", str(tmp_path / "toy")]
    run = ["--data", data, "--out-dir", str(tmp_path / "run"), *TRAIN_TINY, "--max-steps", "2"]
    images = make_folder(tmp_path / "images") or str(tmp_path / "images")
    grid = ["--ckpt", ckpt, "--num-steps", "2", "--num-samples", "2", "--out", str(tmp_path / "g.png")]
    return [(sample.main, [*grid, "--cfg-scale", "nan"], "--cfg-scale"),
            (sample.main, [*grid, "--cfg-scale", "inf"], "--cfg-scale"),
            (sample.main, [*grid, "--timeshift", "0"], "--timeshift"),
            (sample.main, [*grid, "--last-step", "2"], "--last-step"),
            (sample.main, [*grid, "--cfg-interval", "0.9", "0.1"], "--cfg-interval"),
            (sample.main, [*grid[:-1], f"{READ_ONLY}/g.png"], "--out"),
            (sample.main, [*grid, "--npz", f"{READ_ONLY}/s.npz"], "--npz"),
            (sample.main, ["--ckpt", released, "--model", "DDT-XL/3", "--out", str(tmp_path / "g.png")], "--model"),
            (train.main, [*run, "--global-batch-size", "-64"], "--global-batch-size"),
            (train.main, [*run, "--global-batch-size", "0"], "--global-batch-size"),
            (train.main, [*run, "--lr", "nan"], "--lr"),
            (train.main, [*run, "--betas", "0.9", "1"], "--betas"),
            (train.main, [*run, "--log-every", "-1"], "--log-every"),
            (train.main, [*run, "--num-heads", "0"], "--num-heads"),  # once a ZeroDivisionError traceback
            (train.main, [*run, "--patch-size", "0"], "--patch-size"),
            (train.main, [*run, "--num-heads", "5"], "--num-heads"),  # 32 wide: no head dim
            (train.main, [*run[:2], "--out-dir", f"{READ_ONLY}/run", *run[4:]], "--out-dir"),
            (prepare_latents.main, [*toy, "--resolution", "0"], "--resolution"),
            (prepare_latents.main, [*toy, "--resolution", "-5"], "--resolution"),
            (prepare_latents.main, ["--data-path", images, "--vae", VAE_TINY, "--resolution", "30", "--out",
                                    str(tmp_path / "lat")], "--resolution 30: the VAE downsamples by 4"),
            (prepare_latents.main, ["--toy", "--out", f"{READ_ONLY}/toy"], "--out"),
            (evaluate.main, ["--make-ref", images, "--out", str(tmp_path / "r.npz"), "--inception", "x.pth",
                             "--batch-size", "0"], "--batch-size"),
            (evaluate.main, ["--make-ref", images, "--out", str(tmp_path / "r.npz"), "--inception", "x.pth",
                             "--num-images", "3"], "--num-images")]


def test_bad_numbers_and_unwritable_outputs_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    for main, argv, named in bad_input_cases(tmp_path):
        before = sorted(p for p in tmp_path.rglob("*"))
        with pytest.raises(SystemExit) as e:
            main(argv)
        message = str(e.value.code)
        assert named in message and "\n" not in message, (argv, message)  # one line naming the flag or path
        assert sorted(p for p in tmp_path.rglob("*")) == before, argv  # nothing made (nor lost)
    r = run_script("sample.py", "--ckpt", "x.pt", "--cfg-scale", "nan", check=False)  # as a user sees it
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--cfg-scale" in r.stderr and "Traceback" not in r.stderr


def test_every_flag_zero_turns_the_event_off(tmp_path):
    data = make_dataset(tmp_path / "data", n=32)
    run = str(tmp_path / "run")
    train.main(["--data", data, "--out-dir", run, *TRAIN_TINY, "--max-steps", "3", "--log-every", "0",
                "--ckpt-every", "0"])
    assert [r["step"] for r in read_log(run)] == [3]  # no periodic line: the last step's only
    assert sorted(os.listdir(run)) == ["ckpt.pt", "log.jsonl", "samples", "train.lock"]  # the last step's checkpoint
    assert torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)["step"] == 3


def test_non_finite_stop_says_what_is_true(tmp_path):
    data = make_dataset(tmp_path / "data", n=32)
    lat = np.load(os.path.join(data, "latents.npy"), mmap_mode="r+")
    lat[:] = np.nan
    lat.flush()
    with pytest.raises(SystemExit, match=r"at step 1; .*no checkpoint was written before it; check the data, lower "
                                         r"--lr or clip \(--grad-clip 1\); each may change on resume$"):  # fp32 already
        train.main(["--data", data, "--out-dir", str(tmp_path / "run"), *TRAIN_TINY, "--precision", "fp32"])


def test_a_refusal_under_torchrun_is_printed_once(tmp_path):
    data = make_dataset(tmp_path / "data", n=32)
    r = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", "--data", data,
                   "--out-dir", str(tmp_path / "run"), *TRAIN_TINY, "--global-batch-size", "3",
                   env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}, check=False, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and out.count("--global-batch-size 3 must divide by ranks x --grad-accum = 2") == 1
    assert 'train.py", line' not in out and not (tmp_path / "run").exists()


def test_a_failed_final_write_says_what_is_kept(tmp_path, monkeypatch):
    ckpt = save_tiny_ckpt(tmp_path / "ckpt.pt")
    monkeypatch.setattr(plumbing, "save_grid", lambda path, *a: (_ for _ in ()).throw(OSError(28, "No space left on "
                                                                                             "device", path)))
    args = ["--ckpt", ckpt, "--num-steps", 2, "--num-samples", 2, "--out", tmp_path / "g.png"]
    with pytest.raises(SystemExit, match=r"cannot write .*g.png \(No space left on device\); the samples are lost"):
        cli(monkeypatch, *args)
    with pytest.raises(SystemExit, match=r"g.png \(No space left on device\); the samples are in .*s.npz"):
        cli(monkeypatch, *args, "--npz", tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 3)


# =============================================================================================
# the GPU path's defaults, checked on the CPU


def test_device_defaults_compile_on_a_gpu_only():
    args = train.get_args(["--data", "d", "--out-dir", "o"])
    plumbing.device_defaults(args, torch.device("cuda"))  # the device object only: no GPU needed
    assert (args.precision, args.compile, args.num_workers) == ("bf16", True, 4)
    args = train.get_args(["--data", "d", "--out-dir", "o"])
    plumbing.device_defaults(args, torch.device("cpu"))
    assert (args.precision, args.compile, args.num_workers) == ("fp32", False, 2)
    args = train.get_args(["--data", "d", "--out-dir", "o", "--no-compile", "--precision", "fp32", "--num-workers", "0"])
    plumbing.device_defaults(args, torch.device("cuda"))
    assert (args.precision, args.compile, args.num_workers) == ("fp32", False, 0)


def tiny_step_inputs(nan=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    x = x.fill_(math.nan) if nan else x
    return x, torch.tensor([0, 1, 2, 10]), torch.randn(4, 4, 8, 8, generator=gen), torch.rand(4, generator=gen), None


def test_train_step_grad_norm_and_the_skipped_update():
    args = argparse.Namespace(grad_accum=2, precision="fp32", repa_weight=0.5, grad_clip=0.0)
    for clip in (0.0, 0.01):
        student, ref = (train.ModelWithProjector(tiny_model(seed=3), 0, 2) for _ in range(2))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
        args.grad_clip = clip
        norm = train.train_step(student, opt, tiny_step_inputs(), args)[3]
        for k in range(2):  # the same gradients, written out, through clip_grad_norm_
            loss = train.training_loss(ref, *[t[2 * k:2 * k + 2] for t in tiny_step_inputs()[:4]], None, 0.5)[0]
            (loss / 2).backward()
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip if clip else math.inf)
        assert norm == expected  # the norm without clip_grad_norm_'s multiply by 1, the same number
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
        ref_opt.step()
        assert all(torch.equal(a, b) for a, b in zip(student.parameters(), ref.parameters()))
    before = [p.detach().clone() for p in student.parameters()]
    norm = train.train_step(student, opt, tiny_step_inputs(nan=True), args)[3]
    assert not torch.isfinite(norm)  # a non-finite gradient: AdamW skipped the update, its step count too
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(s["step"].item() == 1 for s in opt.state.values())


def test_bench_times_train_py_step(monkeypatch):
    calls = []
    for name in ("step_inputs", "train_step", "update_ema"):
        real = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    step = bench.TrainStep(tiny_model(), 2, (4, 8, 8), torch.device("cpu"), "fp32")
    loss = step()
    assert calls == ["step_inputs", "train_step", "update_ema"] and torch.isfinite(loss)


def test_mfu_counts_the_teacher_and_the_projector():
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        teacher = DINOv2(768, 12)  # DINOv2-B/14, REPA's teacher, at 256 px
        with FlopCounterMode(display=False) as fc:
            teacher(torch.rand(1, 3, 256, 256))
    assert teacher.flops(256, 256) == fc.get_total_flops()
    student = train.ModelWithProjector(DDT(PRESETS["DDT-XL/2"]).to("meta"), 768, 8)
    total = train.training_flops(student, teacher, {"latent_shape": [4, 32, 32], "resolution": 256})
    model = 3 * ddt.flops_per_image(PRESETS["DDT-XL/2"], 32, 32)
    assert total - model == teacher.flops(256, 256) + 3 * 2 * 256 * (2 * 1152 * 1152 + 1152 * 768)
    assert round(teacher.flops(256, 256) / 1e9) == 46 and round((total - model) / model * 100, 1) == 6.6  # was left out


def test_checkpoint_writer_snapshots_and_reports(tmp_path):
    writer, t = plumbing.CheckpointWriter(), torch.zeros(3)
    writer.save({"w": t, "step": 1}, [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    t += 1  # training goes on while the file is written: the file holds the state at save()
    writer.join()
    assert all(torch.equal(torch.load(tmp_path / f, weights_only=True)["w"], torch.zeros(3)) for f in ("a.pt", "b.pt"))
    writer.save({"w": t}, [str(tmp_path / "missing" / "c.pt")])
    with pytest.raises(SystemExit, match="cannot write .*c.pt"):
        writer.join()


# =============================================================================================
# fine-tuning: train.py --init-from, --grad-checkpoint

FROZEN = ["--lr", "0", "--max-steps", "1", "--ckpt-every", "1"]  # lr 0: the weights a run starts from, saved


def test_init_from_a_project_checkpoint_at_another_resolution_then_resume(tmp_path, capsys):
    src, run = str(tmp_path / "src"), str(tmp_path / "run")
    train.main(["--data", make_dataset(tmp_path / "d8", n=32), "--out-dir", src, *TRAIN_TINY, "--max-steps", "3"])
    big = make_dataset(tmp_path / "d16", n=32, latent_shape=(3, 16, 16))  # 4x the tokens: RoPE spans the same extent
    train.main(["--data", big, "--out-dir", run, *TRAIN_TINY, *FROZEN, "--init-from", f"{src}/ckpt.pt"])
    source, new = (torch.load(f"{r}/ckpt.pt", weights_only=True) for r in (src, run))
    assert f"initialized from {src}/ckpt.pt (its EMA weights)" in capsys.readouterr().out
    assert all(torch.equal(source["ema"][k], new[key][k]) for key in ("model", "ema") for k in source["ema"])
    assert new["step"] == 1 and list(new["optimizer"]["state"][0]) and new["args"]["init_from"] == f"{src}/ckpt.pt"
    train.main(["--data", big, "--out-dir", run, *TRAIN_TINY, "--max-steps", "2", "--init-from", f"{src}/ckpt.pt"])
    out = capsys.readouterr().out  # the rerun resumes the new run, never the source
    assert f"{run} holds a run at step 1: resuming it (--init-from only starts a run)" in out
    assert torch.load(f"{run}/ckpt.pt", weights_only=True)["step"] == 2


def test_init_from_the_released_checkpoint_on_other_classes(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ddt.PRESETS, "DDT-T/2", TINY)  # the golden released file's architecture, 10 classes
    released, base = os.path.join(TESTDATA, "ddt_official_tiny.ckpt"), ["--model", "DDT-T/2", "--global-batch-size",
                                                                          "8", "--sample-every", "0", "--num-workers", "0"]
    run = str(tmp_path / "run")
    train.main(["--data", make_dataset(tmp_path / "d", n=16, latent_shape=(4, 8, 8), num_classes=4), "--out-dir", run,
                *base, *FROZEN, "--init-from", released])
    assert "made afresh: y_embedder.embedding_table.weight (10 classes there, 4 here: made afresh but for the null " \
           "class's row, kept)" in capsys.readouterr().out
    want, got = load_ddt(released, TINY).state_dict(), torch.load(f"{run}/ckpt.pt", weights_only=True)["model"]
    table = "y_embedder.embedding_table.weight"
    assert all(torch.equal(want[k], got[k]) for k in want if k != table)  # every other tensor exactly
    torch.manual_seed(0)  # the rows of the 4 new classes: the run's own seeded init; the null row: the source's
    fresh = DDT(replace(TINY, num_classes=4)).state_dict()[table]
    assert torch.equal(got[table][:4], fresh[:4]) and torch.equal(got[table][4], want[table][10])
    with pytest.raises(SystemExit, match=r"--init-from: .*x_embedder.proj.weight is \(32, 16\) there and \(32, 12\) "
                                         r"here: latent channels x patch size\^2 is 16 there and 12 here"):
        train.main(["--data", make_dataset(tmp_path / "c3", n=16), "--out-dir", str(tmp_path / "c3run"), *base,
                    *FROZEN, "--init-from", released])  # 3 channels, not 4
    with pytest.raises(SystemExit, match=r"x_embedder.proj.weight is \(32, 16\) there and \(32, 64\) here"):
        train.main(["--data", make_dataset(tmp_path / "p4", n=16, latent_shape=(4, 8, 8)), "--out-dir",
                    str(tmp_path / "p4run"), *base, "--patch-size", "4", *FROZEN, "--init-from", released])
    with pytest.raises(SystemExit, match="--init-from .*nope.pt: no such file"):
        train.main(["--data", "x", "--out-dir", "y", "--init-from", str(tmp_path / "nope.pt")])


def test_init_from_a_released_checkpoint_keeps_its_repa_projector(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(ddt.PRESETS, "DDT-T/2", TINY)
    ckpt = torch.load(os.path.join(TESTDATA, "ddt_official_tiny.ckpt"), weights_only=True)
    gen = torch.Generator().manual_seed(0)  # the released trainer's keys: a Sequential inside a Sequential
    proj = {f"{i}.{kind}": torch.randn(shape, generator=gen) for i, out in ((0, 32), (2, 32), (4, 128))
            for kind, shape in (("weight", (out, 32)), ("bias", (out,)))}
    for name, extra in (("proj", proj), ("proj_wide", {k: v[:64] if k.startswith("4.") else v for k, v in proj.items()})):
        ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("diffusion_trainer.")}
        ckpt["state_dict"].update({f"diffusion_trainer.proj.0.{k}": v for k, v in extra.items()})
        torch.save(ckpt, tmp_path / f"{name}.ckpt")
    data = make_dataset(tmp_path / "d", n=16, latent_shape=(4, 16, 16), resolution=128, images=True, num_classes=10)
    base = ["--data", data, "--model", "DDT-T/2", "--global-batch-size", "8", "--sample-every", "0", "--num-workers",
            "0", *FROZEN, "--dino", DINO_WEIGHTS, "--repa-layer", "2"]
    train.main([*base, "--out-dir", str(tmp_path / "run"), "--init-from", str(tmp_path / "proj.ckpt")])
    got = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["projector"]
    assert got.keys() == proj.keys() and all(torch.equal(got[k], proj[k]) for k in proj)
    assert "made afresh" not in capsys.readouterr().out
    train.main([*base, "--out-dir", str(tmp_path / "run2"), "--init-from", str(tmp_path / "proj_wide.ckpt")])
    assert "made afresh: the REPA projector (the source's has other shapes" in capsys.readouterr().out


def test_grad_checkpoint_gives_the_same_gradients_saving_memory():
    grads, saved = [], []
    for on in (False, True):
        model = tiny_model(seed=5)
        model.grad_checkpoint = on
        x, y, _, t, _ = tiny_step_inputs()
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            out = model(x, t, y, repa_layer=2)
        (out.v.pow(2).mean() + out.h.pow(2).mean()).backward()
        grads.append([p.grad for p in model.parameters()])
        saved.append(sum(kept))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert saved[1] < saved[0] / 3  # the blocks keep their inputs only


# =============================================================================================
# pins: the numbers a reader reruns (the README's quick start, the miniature study) come from today's code

PINS = os.path.join(TESTDATA, "pins.json")
PIN_MESSAGE = ("the {} gives other numbers than testdata/pins.json: if the change was meant to alter the numbers, "
               "rerun the README's quick start and the width-64 study and update the README, RESULTS and "
               "testdata/pins.json together (NANODDT_UPDATE_PINS=1 python -m pytest -k pin rewrites the file)")


def check_pin(name, values):
    """values against the committed ones, to float32 tolerance (other CPUs round differently in the last bits)."""
    pins = json.load(open(PINS)) if os.path.exists(PINS) else {}
    if os.environ.get("NANODDT_UPDATE_PINS"):
        with plumbing.atomic_write(PINS, "w") as f:
            json.dump(pins | {name: values}, f, indent=1)
        return
    assert name in pins and np.allclose(values, pins[name], rtol=1e-4, atol=0), (PIN_MESSAGE.format(name), values)


def test_pin_the_quick_start(toy_data, tmp_path):
    """The quick start's command for 6 steps (its data, model, batch, lr: the data order, the draws, the loss, AdamW
    and the EMA), logged every step, the EMA's validation loss at steps 3 and 6 on the toy val set's first 64."""
    val = str(tmp_path / "val")
    prepare_latents.main(["--toy", "--split", "val", "--out", val])
    run = str(tmp_path / "run")
    train.main(["--data", toy_data, "--out-dir", run, "--model", "DDT-Toy/4", "--global-batch-size", "64", "--lr",
                "2e-3", "--max-steps", "6", "--log-every", "1", "--ckpt-every", "3", "--val-data", val, "--val-size",
                "64", "--sample-every", "0", "--num-workers", "0"])
    log = read_log(run)
    check_pin("quick start", [r["loss"] for r in log if "loss" in r] + [r["val_loss_ema"] for r in log
                                                                         if "val_loss_ema" in r])


def test_pin_the_study_harness(tmp_path):
    """The width-64 study's harness (experiments.study: its model flags, patch 2, batch 64, lr 2e-3) for 4 steps
    of the improved DiT and 6En2De on hand-made 16 px data: the EMA val-loss curves."""
    data, val = make_dataset(tmp_path / "d", n=128, latent_shape=(3, 16, 16), num_classes=10), \
        make_dataset(tmp_path / "v", n=64, latent_shape=(3, 16, 16), num_classes=10, seed=1)
    results = study.main(["--data", data, "--val-data", val, "--out-dir", str(tmp_path / "s"), "--hidden-size", "64",
                          "--num-heads", "4", "--encoder-depths", "8", "6", "--seeds", "0", "--steps", "4",
                          "--val-every", "2", "--num-samples", "0"])
    check_pin("study harness", [v for r in results for _, v in r["curves"]["0"]])
