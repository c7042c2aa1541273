"""
nanoDDT: the Decoupled Diffusion Transformer in one file.

DDT (Wang, Tian, Huang, Wang, 2025, "DDT: Decoupled Diffusion Transformer", arXiv:2504.05741; released code:
github.com/MCG-NJU/DDT) splits a diffusion transformer in two. A *condition encoder* reads the noisy latent, the
time and the class and produces a per-token self-condition z; a *velocity decoder* reads the noisy latent again,
conditioned on z token by token, and predicts the flow-matching velocity. DDT-XL/2 (22 encoder + 6 decoder
blocks) reaches FID 1.31 on ImageNet 256. Because z changes slowly along the sampling trajectory, a sampler may
reuse it across steps (sample.py).

What differs from DiT: two patch embeddings (encoder and decoder); the block recipe of the "improved DiT"
(RMSNorm, q/k RMSNorm, 2-D RoPE, SwiGLU, adaLN without zero-init and without a SiLU inside); the decoder and the
final layer are modulated per token by z instead of by one vector per image; linear flow matching.

The paper's baseline, the improved DiT (SiT/REPA with the same blocks; `improved_dit.DiT` of the released code),
is this class with the decoder switched off, DDTConfig(decoder_depth=0): one patch embedding, every block and the
final layer modulated per image by c, no z (presets iDiT-*). DDT.forward shows where it stops.

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

The file reads bottom-up: small functions, the layers, Block, FinalLayer, DDTConfig, DDT, PRESETS, FLOPs.
Reading checkpoints (this project's and the released ones) is in pretrained.py, beside the other released files.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

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
    # x (B, nh, N, d), cos/sin (N, d/2) float32: rotate each consecutive pair (x0, x1) by its angle, the real form
    # of the released complex product (x0 + i x1)(cos + i sin), in float32 and back to x's dtype as released (under
    # bf16 autocast q and k are float32 already: RMSNorm's float32 weight promotes them)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, nh, N, d/2) each
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


# -----------------------------------------------------------------------------------------------
# the layers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalised in float32 as released, then times the float32 weight: the output is float32 also for a
        # bf16 x (under autocast), so q and k reach RoPE in float32
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


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size ** 2, dim)  # `.proj` as released

    def forward(self, x):
        return self.proj(patchify(x, self.patch_size))  # (B, C, H, W) -> (B, N, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.mlp[0].in_features))  # (B,) -> (B, D)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # last row: the null class (guidance)

    def forward(self, y):
        return self.embedding_table(y)  # (B,) -> (B, D)


# -----------------------------------------------------------------------------------------------
# the blocks


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

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, N or 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, C*p*p)


# -----------------------------------------------------------------------------------------------
# the model


@dataclass
class DDTConfig:
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    num_heads: int = 16
    encoder_depth: int = 22
    decoder_depth: int = 6  # 0: the improved DiT
    num_classes: int = 1000
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must give a head dim "
                             f"divisible by 4 (RoPE turns pairs of features, by column and by row)")


class Output(NamedTuple):
    v: torch.Tensor  # (B, C, H, W) the velocity
    z: Optional[torch.Tensor]  # (B, N, D) the self-condition; None for the improved DiT
    h: Optional[torch.Tensor]  # (B, N, D) encoder block repa_layer's output; None without it or with a given z


class DDT(nn.Module):
    def __init__(self, cfg: DDTConfig):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        # the released names: s_embedder embeds x_t for DDT's encoder, x_embedder for the decoder (the improved
        # DiT has only x_embedder, which its blocks read)
        if cfg.decoder_depth:
            self.s_embedder = PatchEmbed(p, C, D)
        self.x_embedder = PatchEmbed(p, C, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        # one flat list as released: the first encoder_depth blocks are the encoder, the rest the decoder
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.encoder_depth + cfg.decoder_depth))
        self.final_layer = FinalLayer(D, C * p * p)
        self.grad_checkpoint = False  # train.py --grad-checkpoint: recompute the blocks' activations in backward
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

    def forward(self, x, t, y, z=None, repa_layer=None):
        """x_t (B, C, H, W), t (B,), y (B,) -> Output(v, z, h). Given z (from an earlier sampling step), the
        encoder is skipped and that z is reused: t and y are then unused, the decoder sees them only through z, as
        the paper designs it. repa_layer = k (1-based) also returns h, encoder block k's output."""
        self.check_input(x, z)
        h = None
        if z is None:  # the condition encoder: x_t, t, y -> z
            t_emb = self.t_embedder(t)[:, None]  # (B, 1, D)
            c = F.silu(t_emb + self.y_embedder(y)[:, None])  # (B, 1, D): one condition per image
            s, h = self.encode(x, c, repa_layer)  # (B, N, D)
            if not self.cfg.decoder_depth:  # the improved DiT ends here: its final layer, modulated by c
                return Output(self.final(s, c, x.shape), None, h)
            z = F.silu(t_emb + s)  # (B, N, D): the self-condition, one per token
        return Output(self.decode(x, z), z, h)  # the velocity decoder: x_t, z -> v

    def encode(self, x, c, repa_layer=None):
        """The encoder's blocks on x_t, each modulated by c (B, 1, D): (s (B, N, D) their output, h)."""
        rope = self.rope_tables(x)
        s, h = (self.s_embedder if self.cfg.decoder_depth else self.x_embedder)(x), None  # (B, N, D)
        for i, block in enumerate(self.blocks[: self.cfg.encoder_depth], start=1):
            s = self.run_block(block, s, c, rope)  # (B, N, D)
            h = s if i == repa_layer else h
        return s, h

    def decode(self, x, z):
        """The decoder's blocks on x_t, each and the final layer modulated per token by z: the velocity v."""
        rope = self.rope_tables(x)
        u = self.x_embedder(x)  # (B, N, D)
        for block in self.blocks[self.cfg.encoder_depth:]:
            u = self.run_block(block, u, z, rope)  # (B, N, D)
        return self.final(u, z, x.shape)

    def run_block(self, block, x, c, rope):
        if self.grad_checkpoint and torch.is_grad_enabled():  # keep only the block's input for the backward pass
            return torch.utils.checkpoint.checkpoint(block, x, c, rope, use_reentrant=False)
        return block(x, c, rope)

    def final(self, u, c, shape):
        # the final layer, modulated by c (per image) or z (per token), back to x_t's shape (B, C, H, W)
        return unpatchify(self.final_layer(u, c), self.cfg.patch_size, shape[2], shape[3])

    def rope_tables(self, x):
        # the RoPE tables of x's token grid: a few small kernels, made in each call (compiled: fused into a few)
        p, d = self.cfg.patch_size, self.cfg.hidden_size // self.cfg.num_heads
        return rope_2d(d, x.shape[2] // p, x.shape[3] // p, x.device)

    def check_input(self, x, z):
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        if C != self.cfg.in_channels or H % p or W % p:
            raise ValueError(f"DDT expects (B, {self.cfg.in_channels}, H, W) with H, W divisible by {p}, "
                             f"got {tuple(x.shape)}")
        if z is not None and not self.cfg.decoder_depth:
            raise ValueError("an improved DiT (decoder_depth=0) has no z to reuse: encoder sharing needs a DDT")


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


def flops_per_image(cfg, H, W):
    """Forward matmul FLOPs of one image on H x W latents (2 per multiply-add); a training step costs 3x this."""
    D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    N, hid = (H // p) * (W // p), int(2 * cfg.mlp_ratio * D / 3)
    per_block = 2 * N * (4 * D * D + 3 * D * hid) + 4 * N * N * D  # qkv + proj + SwiGLU, attention
    enc = cfg.encoder_depth * (per_block + 2 * 6 * D * D)  # adaLN: one condition per image
    dec = cfg.decoder_depth * (per_block + 2 * N * 6 * D * D)  # adaLN: one condition per token
    # patch embeddings and the final layer's adaLN: DDT has two embeddings and modulates per token (by z), the
    # improved DiT has one and modulates per image (by c)
    embeddings, conditions = (2, N) if cfg.decoder_depth else (1, 1)
    ends = 2 * N * C * p * p * D * embeddings + 2 * 2 * D * D * conditions + 2 * N * D * C * p * p
    return enc + dec + ends
