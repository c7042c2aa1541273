"""
nanoDDT: the Decoupled Diffusion Transformer in one file.

DDT (Wang, Tian, Huang, Wang, 2025, "DDT: Decoupled Diffusion Transformer") splits a diffusion
transformer in two. A *condition encoder* reads the noisy latent, the time and the class and produces a
per-token self-condition z; a *velocity decoder* reads the noisy latent again, conditioned on z token by
token, and predicts the flow-matching velocity. DDT-XL/2 (22 encoder + 6 decoder blocks) reaches FID 1.31
on ImageNet 256. Because z changes slowly along the sampling trajectory, a sampler may reuse it across
steps (sample.py).

What differs from DiT: two patch embeddings (encoder and decoder); per-block recipe of "improved DiT"
(RMSNorm, q/k RMSNorm, 2-D RoPE, SwiGLU, adaLN without zero-init and without SiLU inside); the decoder
and the final layer are modulated per token by z instead of one vector per image; linear flow matching.

The paper's baseline, the "improved DiT" (SiT/REPA with the same blocks; `improved_dit.DiT` of the released
code), is the same class with the decoder switched off, DDTConfig(decoder_depth=0): one patch embedding
(`x_embedder`), all blocks modulated per image by c, the final layer modulated by c, no z (presets iDiT-*).

Conventions (the released code never states them, and they differ from DiT/SiT/REPA):
    +------------------------------------------------------------------------------------------+
    | t = 0 is noise, t = 1 is data:  x_t = t * x + (1 - t) * eps,  target v = x - eps          |
    | training t = sigmoid(randn)          timestep embedding max_period = 10 (t in [0, 1])     |
    | encoder condition c = silu(t_emb + y_emb)   decoder condition z = silu(t_emb + s)         |
    | null class (classifier-free guidance) = index num_classes                                 |
    | time shift t -> t / (t + (1 - t) * shift)   SwiGLU hidden = int(2/3 * mlp_ratio * D)      |
    +------------------------------------------------------------------------------------------+
Shapes: B batch, C latent channels, H x W latent size, p patch, h x w = H/p x W/p token grid, N = h*w
tokens, D hidden size, nh heads, d = D / nh head dim.

The file reads bottom-up: small functions, RMSNorm, Attention, SwiGLU, Block, FinalLayer, DDTConfig,
DDT, PRESETS, checkpoint loading. After the model come its supporting cast, each under its own heading:
the SD-VAE (AutoencoderKL, with a tiny safetensors reader), the DINOv2 teacher for REPA, and the
distributed set-up and stop-on-signal helpers shared by the scripts.
"""

import argparse
import datetime
import errno
import fcntl
import glob
import json
import math
import os
import pickle
import signal
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------
# small functions


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def patchify(x, p):
    # (B, C, H, W) -> (B, N, C*p*p), features channel-major (c, row, col), tokens row-major (= F.unfold)
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p, H, W):
    # (B, N, C*p*p) -> (B, C, H, W), the exact inverse of patchify
    B, N, _ = x.shape
    x = x.reshape(B, H // p, W // p, -1, p, p)  # (B, h, w, C, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, -1, H, W)


def timestep_embedding(t, dim=256, max_period=10.0):
    # (B,) -> (B, dim); max_period 10 because t is in [0, 1], not [0, 1000] as in DiT. cos first.
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_2d(d, h, w, device, theta=10000.0, extent=16.0):
    # 2-D RoPE tables for an h x w grid: (N, d/2) cos and sin, one angle per pair of head-dim features.
    # Positions are spread over [0, extent] whatever the grid size. Pair 2j turns by col * f_j and pair
    # 2j+1 by row * f_j, with f_j = theta^(-4j/d): x and y interleaved, frequency by frequency.
    f = theta ** (-torch.arange(0, d, 4, dtype=torch.float32, device=device)[: d // 4] / d)  # (d/4,)
    rows, cols = torch.meshgrid(torch.linspace(0, extent, h, device=device),
                                torch.linspace(0, extent, w, device=device), indexing="ij")
    ang = torch.stack([cols.reshape(-1, 1) * f, rows.reshape(-1, 1) * f], dim=-1)  # (N, d/4, 2)
    ang = ang.reshape(h * w, d // 2)  # (N, d/2)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x, cos, sin):
    # x (B, nh, N, d), cos/sin (N, d/2): rotate each consecutive pair (x0, x1) like the complex x0 + i x1.
    # In the DDT, x (q or k) arrives in float32 also under bf16 autocast: RMSNorm's float32 weight promotes its
    # output to float32. So eager bf16 takes the complex float32 path, as the released code does.
    if x.dtype == torch.float32 and not torch.compiler.is_compiling():
        # eager float32: one complex multiply is the fastest kernel (measured 4-5x the real version on CPU)
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.complex(cos, sin)).flatten(-2)
    # compiled (fused by torch.compile; float32 in the DDT, see above), or an x in another dtype: real
    # arithmetic in x's own dtype
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, nh, N, d/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


# -----------------------------------------------------------------------------------------------
# the blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in float32, as released; F.rms_norm is one fused kernel. The product with the float32
        # weight is float32 also for a bf16 x (under autocast): q and k go on to RoPE in float32
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim // num_heads)
        self.k_norm = RMSNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, nh, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, d), scale 1/sqrt(d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One transformer block, the same for encoder and decoder. c is (B, 1, D) or per token (B, N, D)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(2 * mlp_ratio * dim / 3))
        # a one-layer Sequential, kept for the released name `adaLN_modulation.0`; no SiLU inside,
        # the condition arrives already SiLU-ed
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)  # (B, N, D)
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 2 * dim))  # `.0` as released

    def forward(self, x, z):
        shift, scale = self.adaLN_modulation(z).chunk(2, dim=-1)  # (B, N, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, C*p*p)


class PatchEmbed(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)  # `.proj` as released


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.mlp[0].in_features))  # (B, D)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # last row = the null class


# -----------------------------------------------------------------------------------------------
# the model


@dataclass
class DDTConfig:
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    num_heads: int = 16
    encoder_depth: int = 22
    decoder_depth: int = 6
    num_classes: int = 1000
    mlp_ratio: float = 4.0


class DDT(nn.Module):
    def __init__(self, cfg: DDTConfig):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        assert D % cfg.num_heads == 0 and (D // cfg.num_heads) % 4 == 0, "head dim must be a multiple of 4"
        if cfg.decoder_depth:  # DDT's encoder has a patch embedding of its own
            self.s_embedder = PatchEmbed(C * p * p, D)  # encoder input
        self.x_embedder = PatchEmbed(C * p * p, D)  # decoder input; the improved DiT's only one
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        # one flat list as released: the first encoder_depth blocks are the encoder, the rest the decoder
        # (the improved DiT: encoder_depth blocks, no decoder)
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.encoder_depth + cfg.decoder_depth))
        self.final_layer = FinalLayer(D, C * p * p)
        self._rope_cache = {}  # (h, w, device) -> (cos, sin); plain dict, not saved in state_dict
        self.initialize_weights()

    def initialize_weights(self):
        # as released: everything inside the blocks keeps PyTorch's default init (unlike DiT's adaLN-zero)
        for emb in (m for m in self.modules() if isinstance(m, PatchEmbed)):  # s_embedder (DDT), x_embedder
            nn.init.xavier_uniform_(emb.proj.weight)
            nn.init.zeros_(emb.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in (self.final_layer.adaLN_modulation[0], self.final_layer.linear):  # zeroed: v = 0 at init
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def rope(self, H, W, device):
        p, d = self.cfg.patch_size, self.cfg.hidden_size // self.cfg.num_heads
        if torch.compiler.is_compiling():  # computed in the graph: a dict lookup would guard and recompile
            return rope_2d(d, H // p, W // p, device)
        key = (H // p, W // p, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_2d(d, H // p, W // p, device)
        return self._rope_cache[key]

    def _check(self, x):
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        if C != self.cfg.in_channels or H % p or W % p:
            raise ValueError(f"DDT expects (B, {self.cfg.in_channels}, H, W) with H, W divisible by {p}, "
                             f"got {tuple(x.shape)}")

    def _encoder(self, x, t, y, repa_layer):
        # the first encoder_depth blocks on the embedded x, modulated per image by c = silu(t_emb + y_emb):
        # -> their output s (B, N, D), t_emb (B, 1, D), c (B, 1, D), h (the output of block repa_layer, or None)
        self._check(x)
        rope = self.rope(x.shape[2], x.shape[3], x.device)
        t_emb = self.t_embedder(t)[:, None]  # (B, 1, D)
        c = F.silu(t_emb + self.y_embedder.embedding_table(y)[:, None])  # (B, 1, D)
        embedder = self.s_embedder if self.cfg.decoder_depth else self.x_embedder
        s = embedder.proj(patchify(x, self.cfg.patch_size))  # (B, N, D)
        h = None
        for i, block in enumerate(self.blocks[: self.cfg.encoder_depth]):
            s = block(s, c, rope)  # (B, N, D)
            if i + 1 == repa_layer:
                h = s
        return s, t_emb, c, h

    def encode(self, x, t, y, repa_layer=None):
        # noisy latent, time, class -> self-condition z (B, N, D) [and the hidden state after block repa_layer]
        if not self.cfg.decoder_depth:
            raise ValueError("an improved DiT (decoder_depth=0) has no encoder/decoder split: it makes no z")
        s, t_emb, _, h = self._encoder(x, t, y, repa_layer)
        z = F.silu(t_emb + s)  # (B, N, D)
        return z if repa_layer is None else (z, h)

    def decode(self, x, t, z):
        # noisy latent, time, self-condition z -> velocity (B, C, H, W). t is not used: z carries it.
        self._check(x)
        B, C, H, W = x.shape
        rope = self.rope(H, W, x.device)
        h = self.x_embedder.proj(patchify(x, self.cfg.patch_size))  # (B, N, D)
        for block in self.blocks[self.cfg.encoder_depth:]:
            h = block(h, z, rope)  # (B, N, D), modulated per token by z
        return unpatchify(self.final_layer(h, z), self.cfg.patch_size, H, W)  # (B, C, H, W)

    def forward(self, x, t, y, z=None, repa_layer=None):
        """(v, z), or (v, z, h) with repa_layer = k: h is the output of encoder block k (1-based).
        Given z (from an earlier step), the encoder is skipped. The improved DiT returns z = None."""
        h = None
        if not self.cfg.decoder_depth:  # the improved DiT, the paper's baseline: the blocks' output goes to the
            # final layer, modulated by c. What DDT adds (below): z from that output, and a decoder modulated by z
            if z is not None:
                raise ValueError("an improved DiT (decoder_depth=0) has no z to reuse: encoder sharing needs a DDT")
            s, _, c, h = self._encoder(x, t, y, repa_layer)
            v = unpatchify(self.final_layer(s, c), self.cfg.patch_size, x.shape[2], x.shape[3])  # (B, C, H, W)
        else:
            if z is None:
                z = self.encode(x, t, y, repa_layer)
                if repa_layer is not None:
                    z, h = z
            v = self.decode(x, t, z)
        return (v, z) if repa_layer is None else (v, z, h)


PRESETS = {
    # the CPU quick start on the toy set (train.py takes channels and classes from the dataset)
    "DDT-Toy/4": DDTConfig(in_channels=3, patch_size=4, hidden_size=96, num_heads=4, encoder_depth=4, decoder_depth=2,
                           num_classes=10),  # 6 blocks, 1.1M
    "DDT-S/2": DDTConfig(hidden_size=384, num_heads=6, encoder_depth=8, decoder_depth=4),  # 12 blocks, 33M
    "DDT-B/2": DDTConfig(hidden_size=768, num_heads=12, encoder_depth=8, decoder_depth=4),  # 12 blocks, 130M
    "DDT-L/2": DDTConfig(hidden_size=1024, num_heads=16, encoder_depth=20, decoder_depth=4),  # 24 blocks, 458M
    "DDT-XL/2": DDTConfig(hidden_size=1152, num_heads=16, encoder_depth=22, decoder_depth=6),  # 28 blocks, 675M
    # the paper's baselines, the improved DiT (SiT/REPA with the same blocks): DDT without a decoder
    "iDiT-Toy/4": DDTConfig(in_channels=3, patch_size=4, hidden_size=96, num_heads=4, encoder_depth=6, decoder_depth=0,
                            num_classes=10),  # 6 blocks, 1.1M
    "iDiT-S/2": DDTConfig(hidden_size=384, num_heads=6, encoder_depth=12, decoder_depth=0),  # 12 blocks, 33M
    "iDiT-B/2": DDTConfig(hidden_size=768, num_heads=12, encoder_depth=12, decoder_depth=0),  # 12 blocks, 130M
    "iDiT-L/2": DDTConfig(hidden_size=1024, num_heads=16, encoder_depth=24, decoder_depth=0),  # 24 blocks, 458M
    "iDiT-XL/2": DDTConfig(hidden_size=1152, num_heads=16, encoder_depth=28, decoder_depth=0),  # 28 blocks, 675M
}


# -----------------------------------------------------------------------------------------------
# checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


@contextmanager
def atomic_write(path, mode="wb"):
    """Write through a temporary file, renamed into place at the end: a crash never leaves a half-written
    file, and a write that fails (a full disk, an exception in the body) removes the temporary file. Every
    file the scripts write that matters (checkpoints, datasets' meta, samples) goes this way."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_output_folders(*outputs):
    """Stop before any work if an output's folder is missing: `outputs` are (flag, path or None) pairs."""
    for flag, path in outputs:
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise SystemExit(f"error: {flag} {path}: folder {folder} does not exist; create it or pick another")


def save_atomic(obj, path):
    with atomic_write(path) as f:
        torch.save(obj, f)


def remove_stale_tmp(*patterns):
    """Delete what atomic_write left of the files matching the glob `patterns` (their `.tmpPID` files): a killed
    process's leftovers. Call it only where no live process is writing those files."""
    for pattern in patterns:
        for tmp in glob.glob(pattern + ".tmp*"):
            os.remove(tmp)


def lock_file(path, flag, value, script):
    """Take the exclusive lock that lets one `script` run at a time write to `flag value`: a lock on the file
    `path` (created if missing), held while the returned file stays open; released by the OS when the process
    ends, by a crash or SIGKILL too, so no stale lock is ever left behind. SystemExit naming `flag` if a live
    process holds it; None, with a warning, on a filesystem without file locks.

    A POSIX record lock (fcntl.lockf), not flock: a flock lock belongs to the open file, which a forked child
    (a DataLoader worker) shares, so it would outlive a SIGKILL of the main process by the seconds its workers
    take to notice; a record lock belongs to the process and is never inherited by a fork. Its one rule: closing
    any descriptor of `path` in the process drops the lock, so nothing else may open that file. The path is
    checked again once locked, so a lock file that its holder deleted on the way out (unlock) is never taken
    for the file there now."""
    while True:
        f = open(path, "a")  # lockf needs a file open for writing
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise SystemExit(f"{flag} {value} is in use by a live {script} run (it holds {path}); wait for it to "
                                 f"end, or use another {flag}") from None
            print(f"warning: cannot lock {flag} {value} ({e}; a filesystem without file locks?): nothing stops a "
                  f"second run from writing to the same place")
            return None
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                return f
        except FileNotFoundError:
            pass
        f.close()  # its holder deleted it after we opened it: lock the file at `path` now


def unlock(f, remove=False):
    """Release a lock_file lock; `remove`: delete the lock file first, while still holding it."""
    if remove:
        try:
            os.remove(f.name)
        except FileNotFoundError:
            pass
    f.close()


def load_checkpoint(path, allow_pickle=False):
    """torch.load with weights_only=True and messages that say what went wrong. Memory-mapped (mmap=True):
    a tensor is read from the file (through the page cache, which the ranks of one host share) only when it
    is used, so what the caller never touches (a sampler's optimizer state) costs no memory."""
    if os.path.isdir(path):
        inside = os.path.join(path, "ckpt.pt")
        hint = f"; did you mean {inside}?" if os.path.isfile(inside) else " (a checkpoint is a file, e.g. RUN/ckpt.pt)"
        raise FileNotFoundError(f"checkpoint '{path}' is a folder, not a file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    mmap = zipfile.is_zipfile(path)  # torch.save's format since torch 1.6; the legacy one cannot be mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        globals_ = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        if not globals_:  # not a refused Python object: garbage bytes
            raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint (truncated or corrupt?)") from None
        if not allow_pickle:
            raise CheckpointError(
                f"'{path}' holds Python objects that only pickle can read, and unpickling can run arbitrary "
                f"code ({globals_[0].split(' was ')[0]}). If you trust the file, pass allow_pickle=True "
                f"(--allow-pickle on the command line).") from None
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def infer_config(sd):
    """What the weights say about the architecture, including whether it is an improved DiT (one patch
    embedding). Not readable from them: a DDT's encoder/decoder split, and channels vs patch size (only C * p * p
    is)."""
    try:
        D, patch_dim = sd["x_embedder.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        d = sd["blocks.0.attn.q_norm.weight"].shape[0]
        return dict(hidden_size=D, num_heads=D // d, depth=depth, patch_dim=patch_dim,
                    num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
                    improved_dit="s_embedder.proj.weight" not in sd)  # one patch embedding: no decoder
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def check_state_dict(model, sd, source):
    """Strict load with one error listing every missing, unexpected or mis-shaped key and a hint."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        model.load_state_dict(sd, strict=True)
        return
    lines = [f"'{source}' does not fit the model {asdict(model.cfg)}:"]
    for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            lines.append(f"  {name} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
    info = infer_config(sd)
    if info:
        fits = [n for n, c in PRESETS.items() if c.hidden_size == info["hidden_size"]
                and c.encoder_depth + c.decoder_depth == info["depth"]
                and (c.decoder_depth == 0) == info["improved_dit"]]
        kind = ("an improved DiT (one patch embedding: decoder_depth 0)" if info["improved_dit"] else
                "a DDT; the encoder/decoder split cannot be read from the weights: pick the preset that has it")
        lines.append(f"  the weights have hidden size {info['hidden_size']}, {info['num_heads']} heads, "
                     f"{info['depth']} blocks, channels x patch^2 = {info['patch_dim']}, {info['num_classes']} "
                     f"classes" + (f": preset {', '.join(fits)} fits" if fits else "") + f"; {kind} (--model; "
                     "train.py also takes --encoder-depth and --decoder-depth)")
    raise CheckpointError("\n".join(lines))


def load_ddt(path, config=None, ema=True, allow_pickle=False, ckpt=None):
    """A DDT or an improved DiT from (a) this project's checkpoints (config inside; `ema` picks the EMA weights)
    or (b) the released Lightning checkpoints of either (`state_dict` with `ema_denoiser.` / `denoiser.`
    prefixes), which need `config`: a DDTConfig or a preset name (DDT-XL/2, iDiT-XL/2, ...). Strict: any
    mismatch raises CheckpointError. `ckpt`: the contents of `path` if already read with load_checkpoint (a
    released file is several GB)."""
    ckpt = load_checkpoint(path, allow_pickle) if ckpt is None else ckpt
    if isinstance(config, str):
        if config not in PRESETS:
            raise CheckpointError(f"unknown preset '{config}'; choose one of {', '.join(PRESETS)}")
        config = PRESETS[config]
    if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:  # nanoDDT checkpoint
        stored = DDTConfig(**ckpt["config"])
        if config is not None and config != stored:
            raise CheckpointError(f"'{path}' was trained with {asdict(stored)}, not {asdict(config)}; "
                                  f"leave the model config out, it is stored in the checkpoint")
        config, sd = stored, ckpt["ema"] if ema and "ema" in ckpt else ckpt["model"]
    elif isinstance(ckpt, dict) and "state_dict" in ckpt:  # released Lightning checkpoint
        prefix = "ema_denoiser." if ema else "denoiser."
        sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"'{path}' has no '{prefix}*' weights in its state_dict")
        if config is None:
            raise CheckpointError(f"'{path}' is a released checkpoint without a stored config: name the preset "
                                  f"(--model DDT-XL/2, iDiT-XL/2, ...) or pass a DDTConfig; weights: "
                                  f"{infer_config(sd)}")
    else:
        raise CheckpointError(f"'{path}' is neither a nanoDDT checkpoint (keys 'config', 'model') nor a released "
                              f"Lightning checkpoint (key 'state_dict')")
    model = DDT(config)
    check_state_dict(model, sd, path)
    return model.eval()


# ===============================================================================================
# Supporting cast 1: the SD-VAE. diffusers' AutoencoderKL (sd-vae-ft-ema and friends) in plain torch,
# with diffusers' current parameter names, so a diffusers `vae/` folder loads with strict=True.
# Latents are unscaled here; callers multiply by VAE_SCALE before the DDT and divide after sampling.

VAE_SCALE = 0.18215  # SD-VAE scaling factor: brings the latents to roughly unit variance

# safetensors reader: u64 little-endian header length, JSON header, then raw little-endian row-major data
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Read a whole .safetensors file into a dict of cpu tensors; ValueError if malformed or truncated."""
    with open(path, "rb") as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)  # writable buffer: torch.frombuffer warns on bytes
        f.readinto(buf)
    if len(buf) < 8:
        raise ValueError(f"{path}: not a safetensors file ({len(buf)} bytes, shorter than the 8-byte header length)")
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        raise ValueError(f"{path}: not a safetensors file or truncated: header says {n} bytes "
                         f"but file has {len(buf) - 8} after the length field")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except ValueError as e:
        raise ValueError(f"{path}: not a safetensors file (header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    data = memoryview(buf)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
            nbytes, ok = math.prod(shape) * dtype.itemsize, 0 <= begin <= end and min(shape, default=0) >= 0
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: bad header entry for {name!r}: {info!r}") from None
        if not ok or end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r} ({info['dtype']} {shape}) needs {nbytes} bytes "
                             f"but its data_offsets are [{begin}, {end}]")
        if end > len(data):
            raise ValueError(f"{path}: truncated: tensor {name!r} ends at data byte {end} "
                             f"but the file has only {len(data)} data bytes")
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:  # clone: own (aligned) memory instead of a view into the file buffer
            out[name] = torch.frombuffer(data[begin:end], dtype=dtype).reshape(shape).clone()
    return out



# AutoencoderKL (the VAE of Stable Diffusion); GroupNorm eps 1e-6 and SiLU everywhere

VAE_DEFAULTS = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True,
                    mid_block_add_attention=True, scaling_factor=VAE_SCALE)  # = stabilityai/sd-vae-ft-ema


class ResnetBlock2D(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 in the VAE)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over the h*w positions, with a residual (diffusers' `Attention`)."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # list for the `.0` name (diffusers' to_out.1 is dropout)

    def forward(self, x):  # (B, C, h, w)
        B, C, h, w = x.shape
        y = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = (f(y)[:, None] for f in (self.to_q, self.to_k, self.to_v))  # (B, 1, N, C): one head
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, N, C), scale 1/sqrt(C); 4-D for fused kernels
        y = self.to_out[0](y).transpose(1, 2).reshape(B, C, h, w)
        return x + y


class MidBlock(nn.Module):  # UNetMidBlock2D: resnet -> attention -> resnet
    def __init__(self, c, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, groups), ResnetBlock2D(c, c, groups)])
        self.attentions = nn.ModuleList([VAEAttention(c, groups)] if attention else [])

    def forward(self, x):  # (B, C, h, w)
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2); zero pad right and bottom only, as in LDM
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # (B, C, h, w) -> (B, C, 2h, 2w)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, cin, cout, layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(cout)] if downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin, cout, layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(cout)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cin, cz, chs, layers, groups, attention):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(  # the last block keeps the resolution
            DownEncoderBlock2D(chs[max(i - 1, 0)], chs[i], layers, groups, i < len(chs) - 1) for i in range(len(chs)))
        self.mid_block = MidBlock(chs[-1], groups, attention)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cz, 3, padding=1)  # mean and logvar

    def forward(self, x):  # (B, 3, H, W) -> (B, 2*cz, h, w)
        x = self.conv_in(x)  # (B, chs[0], H, W)
        for block in self.down_blocks:
            x = block(x)  # (B, chs[-1], h, w) at the end
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cz, cout, chs, layers, groups, attention):
        super().__init__()
        chs = chs[::-1]  # widest first
        self.conv_in = nn.Conv2d(cz, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], groups, attention)
        self.up_blocks = nn.ModuleList(  # one more resnet per block than the encoder; the last keeps the resolution
            UpDecoderBlock2D(chs[max(i - 1, 0)], chs[i], layers + 1, groups, i < len(chs) - 1) for i in range(len(chs)))
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], cout, 3, padding=1)

    def forward(self, z):  # (B, cz, h, w) -> (B, 3, H, W)
        x = self.mid_block(self.conv_in(z))  # (B, chs[0], h, w)
        for block in self.up_blocks:
            x = block(x)  # (B, chs[-1], H, W) at the end
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL from the fields of its config.json (a dict and/or keyword arguments)."""

    def __init__(self, config=None, **kwargs):
        super().__init__()
        cfg = {**VAE_DEFAULTS, **(config or {}), **kwargs}
        types = set(cfg.get("down_block_types", [])) | set(cfg.get("up_block_types", []))
        if (cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL" or cfg.get("act_fn", "silu") != "silu"
                or not types <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}):
            raise ValueError(f"VAE config not supported (only AutoencoderKL with SiLU, "
                             f"DownEncoderBlock2D and UpDecoderBlock2D): {cfg}")
        self.config = {k: cfg[k] for k in VAE_DEFAULTS}
        chs, cz, groups = list(cfg["block_out_channels"]), cfg["latent_channels"], cfg["norm_num_groups"]
        layers, attention = cfg["layers_per_block"], cfg["mid_block_add_attention"]
        self.encoder = Encoder(cfg["in_channels"], cz, chs, layers, groups, attention)
        self.decoder = Decoder(cz, cfg["out_channels"], chs, layers, groups, attention)
        self.quant_conv = nn.Conv2d(2 * cz, 2 * cz, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(cz, cz, 1) if cfg["use_post_quant_conv"] else None

    def encode(self, img):
        """img (B, 3, H, W) in [-1, 1] -> posterior mean, logvar (B, cz, h, w), unscaled."""
        moments = self.encoder(img)  # (B, 2*cz, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)  # (B, cz, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latent):
        """latent (B, cz, h, w), unscaled (divide by the scaling factor first) -> image (B, 3, H, W) in ~[-1, 1]."""
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)
        return self.decoder(latent)


_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14


def _rename_old_attention_key(k):
    parts = k.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in _OLD_ATTENTION_NAMES:
        parts[-2] = _OLD_ATTENTION_NAMES[parts[-2]]
    return ".".join(parts)


def load_vae(path, config=None):
    """AutoencoderKL (float32, eval, frozen) from a diffusers folder (config.json + diffusion_pytorch_model.
    safetensors or .bin) or from one weights file (.safetensors/.bin/.pt/.ckpt; config: `config` or the SD one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if config is None:
            config_file = os.path.join(path, "config.json")
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"{path}: no config.json (expected a diffusers AutoencoderKL folder)")
            with open(config_file) as f:
                config = json.load(f)
        names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"{path}: no VAE weights (looked for {' or '.join(names)})")
        weights = found[0]
    elif os.path.isfile(path):
        weights = path
    else:
        raise FileNotFoundError(f"VAE path {path} does not exist (give a diffusers AutoencoderKL folder, e.g. a "
                                f"download of stabilityai/sd-vae-ft-ema, or a .safetensors/.bin/.pt weights file)")
    if weights.endswith(".safetensors"):
        sd = read_safetensors(weights)
    else:
        sd = load_checkpoint(weights)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
            raise ValueError(f"{weights}: expected a dict of name -> tensor (a VAE state dict)")
    sd = {_rename_old_attention_key(k): v for k, v in sd.items()}
    if any(k.startswith("first_stage_model.") or k.startswith("encoder.down.") for k in sd):
        raise ValueError(f"{weights}: original LDM/CompVis key names (a full SD checkpoint or an LDM VAE); "
                         f"use the diffusers format instead (e.g. stabilityai/sd-vae-ft-ema)")
    vae = AutoencoderKL(config)
    want = vae.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
             for k, v in want.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{weights}: weights do not fit AutoencoderKL({vae.config}): {len(missing)} missing "
                         f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
                         f"{len(wrong)} of wrong shape {wrong[:5]}")
    vae.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return vae.eval().requires_grad_(False)


# ===============================================================================================
# Supporting cast 2: the DINOv2 teacher for REPA (ViT-S/B/L/14 weights of the official DINOv2 release), also
# the network of FD_DINOv2 in evaluate.py (ViT-L/14, with the hub's position-embedding rule).
# Parameter names follow facebookresearch/dinov2, so `dinov2_vit{s,b,l}14_pretrain.pth` loads with strict=True.
# Inference only: no drop path, no masking (mask_token is kept only because the file has it).

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # with bias, unlike the DDT attention
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class DinoMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DinoBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DinoAttention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DinoMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))  # (B, N, D)
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoPatchEmbed(nn.Module):  # a module of its own only to keep the released name `patch_embed.proj`
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, h*w, D)


class DINOv2(nn.Module):
    """DINOv2 ViT/14. `pos_rule` is how the 37x37 position table is resampled to another token grid:
    "repa" (bicubic with antialiasing to the exact grid size: the REPA teacher, the golden tensors) or "hub"
    (the official hub models' default, bicubic with scale factor (grid + 0.1) / 37 and no antialiasing:
    FD_DINOv2 as EDM2 computes it)."""

    def __init__(self, embed_dim, depth, patch_size=14, num_heads=None, mlp_ratio=4, pos_grid=37, pos_rule="repa"):
        super().__init__()
        if pos_rule not in ("repa", "hub"):
            raise ValueError(f"pos_rule must be 'repa' or 'hub', not {pos_rule!r}")
        self.embed_dim, self.patch_size, self.pos_grid, self.pos_rule = embed_dim, patch_size, pos_grid, pos_rule
        num_heads = num_heads or embed_dim // 64  # head dim 64 in every released size
        self.patch_embed = DinoPatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))  # trained at 518 px
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused here (masked training only)
        self.blocks = nn.ModuleList([DinoBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._pos_cache = {}  # (h, w, device, dtype) -> (1, 1+h*w, D); not in the state dict; the table is frozen

    def pos_embed_for(self, h, w):
        """The 37x37 table resampled to an h x w token grid by `pos_rule`, as DINOv2's interpolate_pos_encoding
        does; in the table's dtype (float32 unless the model was cast), computed in float32."""
        key = (h, w, self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._pos_cache:
            M = self.pos_grid
            pos = self.pos_embed.detach().float()  # (1, 1+M*M, D)
            if (h, w) != (M, M):
                grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
                if self.pos_rule == "repa":  # DINOv2's `interpolate_offset=0` branch (output size), antialiased
                    grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)  # (1, D, h, w)
                else:  # the hub default `interpolate_offset=0.1`: the scale factor sets the sampling positions
                    grid = F.interpolate(grid, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic")
                pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)  # (1, 1+h*w, D)
            self._pos_cache[key] = pos.to(self.pos_embed.dtype)
        return self._pos_cache[key]

    @torch.no_grad()
    def tokens(self, x):
        """Normalized pixels (B, 3, H, W), H and W multiples of the patch size -> final-normed tokens
        (B, 1 + h*w, D), the class token first. Under autocast the token stream stays float32 as in the
        official model: the float32 class token promotes the concatenation, the position table is float32,
        and each residual adds a float32 LayerScale product."""
        B = x.shape[0]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)  # (B, h*w, D), bf16 under autocast
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+h*w, D), promoted to the table's dtype
        x = x + self.pos_embed_for(h, w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    @torch.no_grad()
    def forward(self, images):
        """REPA's teacher: images (B, 3, H, W) in [0, 1] -> final-normed patch tokens (B, N, D),
        N = (224H/256/14)(224W/256/14)."""
        H, W = images.shape[-2:]
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (images - mean) / std  # REPA normalizes first, then resizes
        x = F.interpolate(x, size=(224 * H // 256, 224 * W // 256), mode="bicubic", align_corners=False)
        return self.tokens(x)[:, 1:]  # (B, h*w, D), class token dropped


def load_dino(path, pos_rule="repa"):
    """Load an official DINOv2 ViT-{S,B,L}/14 state dict (e.g. dinov2_vitb14_pretrain.pth): float32, eval, frozen.
    `pos_rule`: "repa" for the REPA teacher, "hub" for FD_DINOv2 (see DINOv2)."""
    try:
        sd = load_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"DINOv2 weights not found at {path}: expected a state dict from the DINOv2 release, "
                                "e.g. dinov2_vitb14_pretrain.pth (ViT-B/14, the REPA teacher)") from None
    if not isinstance(sd, dict) or "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        keys = list(sd)[:5] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{path} is not a DINOv2 state dict (no cls_token / patch_embed.proj.weight); found {keys}")
    if any(k.endswith("mlp.w12.weight") for k in sd):
        raise NotImplementedError(f"{path} is a SwiGLU DINOv2 (ViT-g/14); only ViT-S/B/L/14 are supported")
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    model = DINOv2(sd["cls_token"].shape[-1], depth, patch_size=sd["patch_embed.proj.weight"].shape[-1],
                   pos_grid=math.isqrt(sd["pos_embed"].shape[1] - 1) if "pos_embed" in sd else 37, pos_rule=pos_rule)
    missing, unexpected = model.state_dict().keys() - sd.keys(), sd.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise ValueError(f"{path} does not match DINOv2 ViT/14 (depth {depth}): missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(sd, strict=True)
    return model.float().eval().requires_grad_(False)


# ===============================================================================================
# command lines: every script's --help lists each flag's default


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, but silent where there is no default to tell (None, False) or
    where the help already states it; the description keeps its line breaks."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help:
            return help
        return (help + " " if help else "") + "(default: %(default)s)"


# ===============================================================================================
# distributed set-up and stopping on a signal, shared by the scripts (with torchrun or without, GPU or CPU)

# How long a rank waits in a collective before the process group gives up (NCCL's default is 10 minutes):
# long enough for rank 0 to write an XL checkpoint (~11 GB with the optimizer) or a sample grid to a slow
# shared filesystem while the other ranks wait at the next collective.
DIST_TIMEOUT = datetime.timedelta(minutes=60)


def setup_dist():
    """(rank, local_rank, world_size, device). Under torchrun: one process group (NCCL on GPU, gloo on
    CPU) with DIST_TIMEOUT. Without torchrun: a single process on cuda:0 or the CPU, no process group."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                             f"set torchrun's --nproc_per_node to at most that")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=DIST_TIMEOUT)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    return rank, local_rank, world, device


def cleanup_dist():
    if dist.is_initialized():
        dist.destroy_process_group()


def from_rank0(obj):
    """Rank 0's `obj` on every rank (the object itself without a process group). For what each rank would
    otherwise read on its own, e.g. which files exist on a shared filesystem, whose view may lag on a node."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # preemption (SLURM --signal, torchrun), Ctrl-C
EXIT_STOPPED = 75  # exit status after a stop by signal: EX_TEMPFAIL of sysexits.h, "try again later"


@contextmanager
def stop_signals():
    """Inside, SIGTERM, SIGUSR1 and SIGINT interrupt nothing: each only appends its number to the yielded
    list, which the loop reads (stop_requested) where stopping is safe. So a second signal while a
    checkpoint is written is recorded and the write goes on. The previous handlers come back on exit."""
    received = []
    old = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of the DataLoaders: a signal sent to the whole process group leaves the workers to the
    main process, which stops at a safe point and shuts them down itself."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def stop_requested(received, device):
    """The signal (a number, 0 for none) that stops all ranks now: with a process group, the largest any rank
    has received (all_reduce MAX), so that every rank stops at the same point. A collective under torchrun:
    every rank must call it at the same points of its loop."""
    if not dist.is_initialized():
        return max(received, default=0)
    s = torch.tensor([max(received, default=0)], device=device)
    dist.all_reduce(s, op=dist.ReduceOp.MAX)
    return int(s.item())
