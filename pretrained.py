"""
Weights read from their files, in plain torch. A DDT from this project's checkpoints or from the released
Lightning files (load_ddt; init_weights for train.py --init-from; load_for_sampling for sample.py), with
messages that say what does not fit and which preset would. The frozen pretrained networks: the SD-VAE
(diffusers' AutoencoderKL, with a small safetensors reader) that maps images to latents and back, and the
DINOv2 ViT that REPA aligns the encoder with (load_teacher; also evaluate.py's FD_DINOv2 network). Parameter
names follow the releases, so their files load with strict=True. The pretrained networks are inference only.
"""

import json
import math
import os
import struct
import sys
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddt import DDT, PRESETS, DDTConfig
from plumbing import CheckpointError, all_gather, load_checkpoint, refuse, weights_digest

# -----------------------------------------------------------------------------------------------
# DDT weights from this project's checkpoints or the released Lightning files, loaded strictly with messages that
# say what does not fit and which preset would


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


def weights_of(ckpt, path, ema=True):
    """(state dict, stored DDTConfig or None, REPA projector's state dict or {}) of a checkpoint of either kind:
    this project's (`config`, `model`, `ema`, `projector`) or the released Lightning files (`state_dict` with the
    `ema_denoiser.` and `denoiser.` prefixes, no config, REPA's projector under `diffusion_trainer.proj.0.`: the
    released trainer's Sequential inside a Sequential). `ema` picks the EMA weights."""
    if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:  # nanoDDT
        sd = ckpt["ema"] if ema and "ema" in ckpt else ckpt["model"]
        return dict(sd), DDTConfig(**ckpt["config"]), ckpt.get("projector") or {}
    if isinstance(ckpt, dict) and "state_dict" in ckpt:  # released Lightning
        prefix = "ema_denoiser." if ema else "denoiser."
        sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"'{path}' has no '{prefix}*' weights in its state_dict")
        proj = "diffusion_trainer.proj.0."
        return sd, None, {k[len(proj):]: v for k, v in ckpt["state_dict"].items() if k.startswith(proj)}
    raise CheckpointError(f"'{path}' is neither a nanoDDT checkpoint (keys 'config', 'model') nor a released "
                          f"Lightning checkpoint (key 'state_dict')")


def load_ddt(path, config=None, ema=True, allow_pickle=False, ckpt=None):
    """A DDT or an improved DiT from this project's checkpoints (config inside) or the released Lightning
    checkpoints of either, which need `config`: a DDTConfig or a preset name (DDT-XL/2, iDiT-XL/2, ...). `ema`
    picks the EMA weights. Strict: any mismatch raises CheckpointError. `ckpt`: the contents of `path` if already
    read with load_checkpoint (a released file is several GB)."""
    ckpt = load_checkpoint(path, allow_pickle) if ckpt is None else ckpt
    if isinstance(config, str):
        if config not in PRESETS:
            raise CheckpointError(f"unknown preset '{config}'; choose one of {', '.join(PRESETS)}")
        config = PRESETS[config]
    sd, stored, _ = weights_of(ckpt, path, ema)
    if stored is not None and config is not None and config != stored:
        raise CheckpointError(f"'{path}' was trained with {asdict(stored)}, not {asdict(config)}; leave the model "
                              f"config out, it is stored in the checkpoint")
    if stored is None and config is None:
        raise CheckpointError(f"'{path}' is a released checkpoint without a stored config: name the preset "
                              f"(--model DDT-XL/2, iDiT-XL/2, ...) or pass a DDTConfig; weights: {infer_config(sd)}")
    model = DDT(stored or config)
    check_state_dict(model, sd, path)
    return model.eval()


def init_weights(path, model, projector=None, allow_pickle=False):
    """train.py --init-from: `model` (and REPA's `projector`, where the source has one of its shapes) from the EMA
    weights of `path`, a project checkpoint or a released Lightning one: the EMA is the model that samples best and
    what fine-tuning usually starts from. The weights carry over to another latent size (RoPE spreads any token
    grid over the same extent). For another class count the label embedding is made afresh (the model's own seeded
    init), but for its last row, the null class that guidance samples with, which keeps the source's. Everything
    else loads strictly: CheckpointError names what does not fit. Returns what was made afresh."""
    sd, _, proj = weights_of(load_checkpoint(path, allow_pickle), path)
    own, fresh, table, x_key = model.state_dict(), [], "y_embedder.embedding_table.weight", "x_embedder.proj.weight"
    if x_key in sd and sd[x_key].shape[1] != own[x_key].shape[1]:
        raise CheckpointError(f"'{path}': {x_key} is {tuple(sd[x_key].shape)} there and {tuple(own[x_key].shape)} "
                              f"here: latent channels x patch size^2 is {sd[x_key].shape[1]} there and "
                              f"{own[x_key].shape[1]} here, and they must match (the same VAE's latents, the same "
                              f"--patch-size)")
    if table in sd and sd[table].shape[0] != own[table].shape[0] and sd[table].shape[1:] == own[table].shape[1:]:
        new = own[table].clone()
        new[-1] = sd[table][-1]  # the null class
        fresh.append(f"{table} ({sd[table].shape[0] - 1} classes there, {own[table].shape[0] - 1} here: made afresh "
                     f"but for the null class's row, kept)")
        sd[table] = new
    check_state_dict(model, sd, path)
    if projector is not None:
        shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
        if proj and shapes == {k: tuple(v.shape) for k, v in proj.items()}:
            projector.load_state_dict(proj)
        else:  # none there, or one for another teacher's width
            fresh.append("the REPA projector (" + ("the source has none)" if not proj else "the source's has other "
                                                   "shapes: a teacher of another width?)"))
    return fresh


def sampling_checkpoint(args):
    """sample.py's --ckpt (with --model, --image-size, --vae, --allow-pickle of `args`), either kind: (ckpt, config
    for load_ddt, info: latent_shape, scale, vae, class_names). Memory-mapped; the optimizer state (and REPA
    projector) is dropped before anything reads it. A released checkpoint is an ImageNet model on SD-VAE latents."""
    ckpt = load_checkpoint(args.ckpt, args.allow_pickle)
    if isinstance(ckpt, dict) and "config" in ckpt:  # nanoDDT: config and data description inside
        for key in ("optimizer", "projector"):
            ckpt.pop(key, None)
        d = ckpt.get("data") or {}
        if not {"latent_shape", "scaling_factor"} <= d.keys():
            raise SystemExit(f"error: '{args.ckpt}' has no 'data' entry with latent_shape and scaling_factor")
        vae = str(d.get("vae", "none"))
        if args.vae and vae != "none" and os.path.realpath(args.vae) != os.path.realpath(vae):
            print(f"warning: --vae {args.vae} is not the VAE that '{args.ckpt}' was trained with ({vae}); the "
                  f"samples are right only if the two are the same weights", file=sys.stderr)
        return ckpt, args.model, dict(latent_shape=tuple(d["latent_shape"]), scale=d["scaling_factor"], vae=vae,
                                      class_names=d.get("class_names"))
    if isinstance(ckpt, dict) and "state_dict" in ckpt:  # released: keep the weights, not the optimizer states
        ckpt = {"state_dict": ckpt["state_dict"]}
    # a released Lightning checkpoint (or not a checkpoint at all: load_ddt says so): ImageNet, SD-VAE latents
    if args.model is None and "state_dict" in ckpt:
        print(f"'{args.ckpt}' is a released checkpoint, which does not store its encoder/decoder split: assuming "
              f"--model DDT-XL/2 (name the preset with --model)", file=sys.stderr)
    config = args.model or "DDT-XL/2"
    size = args.image_size // 8  # SD-VAE latents
    return ckpt, config, dict(latent_shape=(PRESETS[config].in_channels, size, size), scale=VAE_SCALE,
                              vae="sd-vae-ft-ema", class_names=None)


def dataset_vae(meta, device):
    """The VAE of a latent dataset (its meta.json's), to decode train.py's sample grids; None in pixel space."""
    if meta["vae"] == "none":
        return None
    try:
        return load_vae(meta["vae"]).to(device)
    except (OSError, ValueError) as e:
        refuse(f"the dataset's VAE, which decodes the sample grids: {e}; train without grids: --sample-every 0")


def load_for_sampling(args, device):
    """sample.py's model (EMA weights), its VAE (None in pixel space) and info (sampling_checkpoint's, and the
    weights' digest) from --ckpt, --model, --vae; a SystemExit saying what is wrong with them. Every rank must
    hold the same weights: a checkpoint rewritten while the ranks load it would mix two models in one .npz."""
    try:
        ckpt, config, info = sampling_checkpoint(args)
        if info["vae"] != "none" and args.vae is None:
            raise SystemExit(f"error: '{args.ckpt}' is a latent model (its VAE: {info['vae']}): pass --vae PATH")
        model = load_ddt(args.ckpt, config, ema=True, ckpt=ckpt)
        del ckpt
        info["digest"] = weights_digest(model)
        vae = None if info["vae"] == "none" else load_vae(args.vae).to(device)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {e}") from None
    if bad := [c for c in args.classes or [] if c >= model.cfg.num_classes]:
        raise SystemExit(f"error: --classes {bad} out of range: the model has classes 0..{model.cfg.num_classes - 1}")
    if args.encoder_steps is not None and not model.cfg.decoder_depth:
        raise SystemExit(f"error: --encoder-steps: '{args.ckpt}' is an improved DiT (decoder_depth 0): it has no "
                         f"encoder/decoder split, so there is no z to share; leave --encoder-steps out")
    if len(set(all_gather(info["digest"]))) > 1:
        raise SystemExit(f"error: the ranks read different weights from '{args.ckpt}' (was it rewritten while "
                         f"they loaded it?); rerun when it no longer changes, or sample from a copy")
    return model.to(device), vae, info


# -----------------------------------------------------------------------------------------------
# the SD-VAE: diffusers' AutoencoderKL (sd-vae-ft-ema and friends) in plain torch,
# with diffusers' current parameter names, so a diffusers `vae/` folder loads with strict=True.
# Latents are unscaled here; callers multiply by the dataset's scaling factor (VAE_SCALE for the SD-VAE) before
# the DDT and divide after sampling.

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


# -----------------------------------------------------------------------------------------------
# the DINOv2 teacher for REPA (ViT-S/B/L/14 weights of the official DINOv2 release), also
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
        # ImageNet's pixel mean and std, kept on the model's device: a table made per call would be a blocking copy
        # from the host on a GPU, a wait for the whole queued step (not in the state dict)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

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

    def flops(self, H, W):
        """Matmul FLOPs (2 per multiply-add) of forward() on one (3, H, W) image, for MFU."""
        n = (224 * H // 256 // self.patch_size) * (224 * W // 256 // self.patch_size)  # patches; + the class token
        D, hid = self.embed_dim, self.blocks[0].mlp.fc1.out_features
        per_block = 2 * (n + 1) * (4 * D * D + 2 * D * hid) + 4 * (n + 1) ** 2 * D  # qkv, proj, MLP; attention
        return len(self.blocks) * per_block + 2 * n * 3 * self.patch_size ** 2 * D  # + the patch embedding

    @torch.no_grad()
    def forward(self, images):
        """REPA's teacher: images (B, 3, H, W) in [0, 1] -> final-normed patch tokens (B, N, D),
        N = (224H/256/14)(224W/256/14)."""
        H, W = images.shape[-2:]
        x = (images - self.mean) / self.std  # REPA normalizes first, then resizes
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


def load_teacher(path, resolution, num_tokens, device):
    """REPA's DINOv2 teacher from `path` (--dino), checked to give `num_tokens` tokens (the DDT's) for images of
    `resolution` pixels; a SystemExit naming --dino otherwise."""
    try:
        teacher = load_dino(path).to(device)
    except (OSError, ValueError, NotImplementedError) as e:
        refuse(f"--dino: {e}")
    with torch.no_grad():
        n = teacher(torch.zeros(1, 3, resolution, resolution, device=device)).shape[1]
    if n != num_tokens:
        refuse(f"REPA needs as many DINOv2 tokens as DDT tokens: {n} from {resolution} px images vs "
               f"{num_tokens} of the DDT (latents / --patch-size, squared)")
    return teacher
