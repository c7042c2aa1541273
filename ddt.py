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
DDT, PRESETS, checkpoint loading. The frozen pretrained networks (SD-VAE, DINOv2) are in pretrained.py, the
scripts' shared plumbing (atomic writes, locks, distributed set-up, signals) in plumbing.py; this file imports
neither.
"""

import math
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass

import torch
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
