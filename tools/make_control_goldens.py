"""Goldens for ControlNet, img2img targets and StyleAligned per level / per step window.

Usage (from the repository root):

    <venv>/bin/python tools/make_control_goldens.py            # writes into tests/fixtures/goldens/
    <venv>/bin/python tools/make_control_goldens.py --check    # regenerates in memory, compares bitwise
    <venv>/bin/python tools/make_control_goldens.py --out DIR  # writes the same files into DIR (no manifest)
    <venv>/bin/python tools/make_control_goldens.py --refharness DIR
                         writes nothing: compares this script's StyleAligned patch (all levels) with the
                         team's reference sa_ref.apply_comfy (DIR holds sa_ref.py) and checks that the
                         levels partition the UNet's GroupNorms and attn1 layers

Inputs (already committed): tests/fixtures/goldens/tiny_sd15/{unet,vae,text_encoder,scheduler} and
tests/fixtures/goldens/tiny_sdxl_pipe/. Outputs (see tools/README.md for what each file holds):

    tiny_sd2/unet/                                     tiny SD2-like UNet (part sd2; random weights)
    tiny_controlnet_sd15/, tiny_controlnet_sdxl/, tiny_controlnet_sd2/
                                                       diffusers ControlNetModel folders (random weights)
    tiny_controlnet_single/control_tiny_{sd15,sdxl,sd2}.safetensors (+ .json)
                                                       the same weights in the original ControlNet layout
    controlnet_sd15.safetensors, controlnet_sdxl.safetensors, controlnet_sd2.safetensors
                                                                    kind "controlnet_unet"
    controlnet_pipe_sd15.safetensors, controlnet_pipe_sdxl.safetensors  kind "controlnet_pipe"
    img2img_sd15.safetensors                                           kind "img2img_pipe"
    style_window_sd15.safetensors                                      kind "style_window_pipe"

CPU, float32, one thread. Every golden's `info` metadata (JSON) describes its cases completely, and
records how far the manual loop is from diffusers' own pipeline run with the same inputs.
"""
from __future__ import annotations

import math
import copy
import json
import os
import shutil
import sys
from pathlib import Path

# goldens_common first: it sets the environment (threads, offline hub) before torch is imported
from goldens_common import GOLDENS, Out, arg_parser, check_or_write, gen, mad, randomize_norm_affine, versions, write_json

import numpy
import torch
import torch.nn as nn
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

GENERATOR = "tools/make_control_goldens.py"

CN_SD15 = "tiny_controlnet_sd15"
CN_SDXL = "tiny_controlnet_sdxl"
CN_SD2 = "tiny_controlnet_sd2"
CN_SINGLE = "tiny_controlnet_single"
SD15 = "tiny_sd15"
SD2 = "tiny_sd2"
SDXL_PIPE = "tiny_sdxl_pipe"

# conditioning embedding widths: the number of stride-2 convs (len - 1) matches each VAE's factor
CN_SD15_COND_CHANNELS = (8, 16)            # x2: image 32x32 -> latent 16x16 (tiny_sd15/vae)
CN_SDXL_COND_CHANNELS = (4, 8, 8, 16)      # x8: image 64x64 -> latent 8x8 (tiny_sdxl_pipe/vae)
CN_SD2_COND_CHANNELS = (8, 16)             # x2: image 32x32 -> latent 16x16
SEEDS = dict(cn_sd15=701, cn_sdxl=702, cn_unet_sd15=710, cn_unet_sdxl=720, cn_pipe_sd15=730,
             cn_pipe_sdxl=740, img2img=750, window=760, unet_sd2=770, cn_sd2=771, cn_unet_sd2=780)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def randn(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float32)


def rand(seed: int, *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=gen(seed), dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# loading the committed tiny models
# ------------------------------------------------------------------------------------------
def load_sd15(goldens: Path) -> dict:
    d = goldens / SD15
    unet = UNet2DConditionModel.from_pretrained(str(d / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(d / "vae")).eval()
    te = CLIPTextModel.from_pretrained(str(d / "text_encoder"), attn_implementation="eager").eval()
    sched_cfg = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    return {"unet": unet, "vae": vae, "text_encoder": te, "scheduler_config": sched_cfg}


def load_sdxl(goldens: Path) -> dict:
    from transformers import CLIPTextModelWithProjection
    d = goldens / SDXL_PIPE
    return {
        "unet": UNet2DConditionModel.from_pretrained(str(d / "unet")).eval(),
        "vae": AutoencoderKL.from_pretrained(str(d / "vae")).eval(),
        "text_encoder": CLIPTextModel.from_pretrained(str(d / "text_encoder"), attn_implementation="eager").eval(),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(str(d / "text_encoder_2"),
                                                                      attn_implementation="eager").eval(),
        "scheduler_config": json.loads((d / "scheduler" / "scheduler_config.json").read_text()),
    }


# ------------------------------------------------------------------------------------------
# tiny ControlNets
# ------------------------------------------------------------------------------------------
def build_controlnet(unet: UNet2DConditionModel, cond_channels: tuple, seed: int) -> ControlNetModel:
    """A ControlNet with the UNet's encoder architecture and ALL weights random: PyTorch's default
    init under `seed` (not copied from the UNet), then the zero-initialised layers (zero convs
    controlnet_down_blocks / controlnet_mid_block and the conditioning embedding's conv_out)
    re-initialised with the default init (else every residual would be 0), then random norm affines."""
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cond_channels,
                                   load_weights_from_unet=False)
    zero_layers = list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block,
                                                     cn.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for m in zero_layers:
            m.reset_parameters()
    randomize_norm_affine(cn, seed + 1)
    return cn.eval()


_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def hint_conv_out_index(n_blocks: int) -> int:
    """Index of the conditioning embedding's conv_out in `input_hint_block`. The original ControlNet's
    hint block is a fixed nn.Sequential of 15 modules (conv, SiLU, ... 7 convs) with conv_out at 14, and
    diffusers' converter reads conv_out from index 14 whatever the block count; so a hint block with
    fewer convs keeps conv_out at 14 (blocks at 2, 4, ...), and only a longer one moves it past."""
    return max(14, 2 * (n_blocks + 1))


def controlnet_to_ldm(sd: dict, config) -> dict:
    """diffusers ControlNetModel state dict -> the original ControlNet checkpoint layout
    (`control_model.` + time_embed, label_emb, input_blocks, middle_block, input_hint_block,
    zero_convs, middle_block_out). Raises on any key it does not map."""
    per = config.layers_per_block + 1
    n_hint_blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    out = {}

    def resnet(rest: str) -> str:
        name, tail = rest.split(".", 1)
        return dict(_RESNET_TO_LDM)[name] + "." + tail

    for k, v in sd.items():
        p = k.split(".")
        if k.startswith("time_embedding.linear_1."):
            new = "time_embed.0." + p[-1]
        elif k.startswith("time_embedding.linear_2."):
            new = "time_embed.2." + p[-1]
        elif k.startswith("add_embedding.linear_1."):
            new = "label_emb.0.0." + p[-1]
        elif k.startswith("add_embedding.linear_2."):
            new = "label_emb.0.2." + p[-1]
        elif k.startswith("conv_in."):
            new = "input_blocks.0.0." + p[-1]
        elif k.startswith("controlnet_cond_embedding.conv_in."):
            new = "input_hint_block.0." + p[-1]
        elif k.startswith("controlnet_cond_embedding.blocks."):
            new = f"input_hint_block.{2 * (int(p[2]) + 1)}." + p[-1]
        elif k.startswith("controlnet_cond_embedding.conv_out."):
            new = f"input_hint_block.{hint_conv_out_index(n_hint_blocks)}." + p[-1]
        elif k.startswith("down_blocks."):
            b, kind = int(p[1]), p[2]
            rest = ".".join(p[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + b * per + int(p[3])}.0." + resnet(rest)
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * per + int(p[3])}.1." + rest
            elif kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.{weight,bias}
                new = f"input_blocks.{1 + b * per + per - 1}.0.op." + p[-1]
            else:
                raise KeyError(k)
        elif k.startswith("mid_block.resnets."):
            new = f"middle_block.{2 * int(p[2])}." + resnet(".".join(p[3:]))
        elif k.startswith("mid_block.attentions.0."):
            new = "middle_block.1." + ".".join(p[3:])
        elif k.startswith("controlnet_down_blocks."):
            new = f"zero_convs.{int(p[1])}.0." + p[-1]
        elif k.startswith("controlnet_mid_block."):
            new = "middle_block_out.0." + p[-1]
        else:
            raise KeyError(k)
        assert ("control_model." + new) not in out, new
        out["control_model." + new] = v.detach().clone().contiguous()
    return out


def single_file_check(single: Path, folder: Path, cn: ControlNetModel) -> dict:
    """Read the single file back through diffusers' own converter (convert_controlnet_checkpoint, what
    ControlNetModel.from_single_file uses) and compare with the folder's weights bitwise.

    One place where that converter cannot read the SDXL file is bridged explicitly and recorded:
    * it never maps `label_emb` (SDXL's add_embedding), although diffusers' own table
      DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"] lists it: that table is applied.
    The full from_single_file call is tried too and its outcome recorded."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
    ckpt = load_file(str(single))
    cfg = json.loads((folder / "config.json").read_text())
    conv = convert_controlnet_checkpoint(dict(ckpt), cfg)
    fixups = []
    if cfg.get("addition_embed_type") == "text_time":
        for dk, lk in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
            conv[dk] = ckpt["control_model." + lk]
        fixups.append("add_embedding <- label_emb via DIFFUSERS_TO_LDM_MAPPING['controlnet']['addition_embed_type']")
    conv = {k: v for k, v in conv.items() if v is not None}
    model = ControlNetModel.from_config(cfg)
    missing, unexpected = model.load_state_dict(conv, strict=False)
    a, b = cn.state_dict(), model.state_dict()
    differing = sorted(k for k in a if not torch.equal(a[k], b[k]))
    res = {"diffusers_converter": "diffusers.loaders.single_file_utils.convert_controlnet_checkpoint",
           "fixups": fixups, "keys_missing": sorted(missing), "keys_unexpected": sorted(unexpected),
           "tensors_differing": differing, "num_keys": len(ckpt),
           "identical": not missing and not unexpected and not differing and len(ckpt) == len(a)}
    try:
        loaded = ControlNetModel.from_single_file(str(single), config=str(folder))
        la = loaded.state_dict()
        same = set(a) == set(la) and all(torch.equal(a[k], la[k]) for k in a)
        res["from_single_file"] = "loads, identical" if same else "loads, differs"
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
        res["from_single_file"] = f"fails ({type(e).__name__}), because of the fixup above"
    return res


def controlnet_folders(out: Out, sd15: dict, sdxl: dict) -> dict:
    """Write both ControlNet folders and the single files; return the built models."""
    nets = {}
    for tag, rel, comps, ch, seed, unet_rel in (
            ("sd15", CN_SD15, sd15, CN_SD15_COND_CHANNELS, SEEDS["cn_sd15"], f"{SD15}/unet"),
            ("sdxl", CN_SDXL, sdxl, CN_SDXL_COND_CHANNELS, SEEDS["cn_sdxl"], f"{SDXL_PIPE}/unet")):
        nets[tag] = controlnet_folder(out, tag, rel, comps["unet"], ch, seed, unet_rel)
    return nets


def controlnet_folder(out: Out, tag: str, rel: str, unet, ch: tuple, seed: int, unet_rel: str) -> dict:
    """Write one ControlNet folder and its original-layout single file (+ .json); verify the single file
    through diffusers' converter; return the model read back from the folder."""
    cn = build_controlnet(unet, ch, seed)
    d = out.root / rel
    if d.exists():
        shutil.rmtree(d)
    cn.save_pretrained(str(d), safe_serialization=True)
    back = ControlNetModel.from_pretrained(str(d)).eval()
    a, b = cn.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    factor = 2 ** (len(ch) - 1)
    out.folder(rel, {
        "kind": "controlnet_weights", "layout": "diffusers ControlNetModel (config.json + "
                                                "diffusion_pytorch_model.safetensors)",
        "matches_unet": unet_rel, "conditioning_embedding_out_channels": list(ch),
        "conditioning_downsampling": factor, "seed": seed,
        "num_params": sum(p.numel() for p in cn.parameters()),
        "note": ("all weights random: PyTorch default init under `seed` (not copied from the UNet); the zero "
                 "convs (controlnet_down_blocks, controlnet_mid_block) and controlnet_cond_embedding.conv_out "
                 "re-initialised with the default init; GroupNorm/LayerNorm affines random "
                 "(1 + 0.1 N(0,1), 0.1 N(0,1)). Control images are pixels in [0,1] at "
                 f"{factor}x the latent size."),
    })
    # the original single-file layout
    stem = f"control_tiny_{tag}"
    sdir = out.root / CN_SINGLE
    sdir.mkdir(parents=True, exist_ok=True)
    ldm = controlnet_to_ldm(cn.state_dict(), cn.config)
    f = sdir / f"{stem}.safetensors"
    save_file(ldm, str(f), metadata={"format": "pt"})
    os.chmod(f, 0o644)
    write_json(sdir / f"{stem}.json", json.loads((d / "config.json").read_text()))
    chk = single_file_check(f, d, cn)
    assert chk["identical"], chk
    net = {"model": back, "rel": rel, "single_file_check": chk}
    out.files += [f"{CN_SINGLE}/{stem}.safetensors", f"{CN_SINGLE}/{stem}.json"]
    out.entries[f"{CN_SINGLE}/{stem}.safetensors"] = {
        "kind": "controlnet_single_file", "same_weights_as": rel + "/", "config": f"{stem}.json",
        "generator": GENERATOR, "size_bytes": f.stat().st_size, "num_tensors": len(ldm),
        "layout": ("original ControlNet checkpoint: every key starts with `control_model.`; time_embed.{0,2} "
                   "(time_embedding.linear_1/2), label_emb.0.{0,2} (SDXL add_embedding.linear_1/2), "
                   "input_blocks.0.0 (conv_in), input_blocks.{1+b*(L+1)+l}.0 (down_blocks.b.resnets.l: "
                   "in_layers.0=norm1, in_layers.2=conv1, emb_layers.1=time_emb_proj, out_layers.0=norm2, "
                   "out_layers.3=conv2, skip_connection=conv_shortcut), input_blocks.{...}.1 "
                   "(down_blocks.b.attentions.l, inner keys unchanged), input_blocks.{1+b*(L+1)+L}.0.op "
                   "(down_blocks.b.downsamplers.0.conv), middle_block.{0,1,2} (mid_block.resnets.0, "
                   "attentions.0, resnets.1), zero_convs.i.0 (controlnet_down_blocks.i), middle_block_out.0 "
                   "(controlnet_mid_block), input_hint_block.0 (controlnet_cond_embedding.conv_in), "
                   "input_hint_block.2(j+1) (controlnet_cond_embedding.blocks.j), input_hint_block.14 "
                   "(controlnet_cond_embedding.conv_out; 14 as in the original ControlNet's fixed hint "
                   "Sequential and as diffusers' converter reads it, also when there are fewer hint convs: "
                   "in the SD1.5 file the blocks are at 2 and 4 and conv_out at 14)."),
        "verification": chk,
    }
    return net


SD2_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    # SD2's config names the number of heads per block `attention_head_dim` ([5, 10, 20, 20]: head dim 64);
    # here [2, 4, 4] heads: head dim 8 in every block
    attention_head_dim=(2, 4, 4), cross_attention_dim=48, use_linear_projection=True, norm_num_groups=4,
    upcast_attention=False)


def sd2_unet_folder(out: Out) -> UNet2DConditionModel:
    """The tiny SD2-like UNet (linear projections, per-block head counts, 48-wide cross-attention, no
    addition embedding): PyTorch's default init under a fixed seed, random norm affines; written as
    tiny_sd2/unet/ and read back (bitwise)."""
    seed = SEEDS["unet_sd2"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD2_UNET_CONFIG)
    randomize_norm_affine(unet, seed + 1)
    unet.eval()
    rel = f"{SD2}/unet"
    d = out.root / rel
    if d.exists():
        shutil.rmtree(d)
    unet.save_pretrained(str(d), safe_serialization=True)
    back = UNet2DConditionModel.from_pretrained(str(d)).eval()
    a, b = unet.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    out.folder(rel, {
        "kind": "unet_weights", "layout": "diffusers UNet2DConditionModel (config.json + "
                                          "diffusion_pytorch_model.safetensors)",
        "family": "sd2", "seed": seed, "num_params": sum(p.numel() for p in unet.parameters()),
        "note": ("tiny SD2-like UNet: use_linear_projection, attention_head_dim per block [2, 4, 4] (number of "
                 "heads, as SD2's [5, 10, 20, 20]; head dim 8), cross_attention_dim 48, no addition embedding. "
                 "All weights random: PyTorch default init under `seed`, GroupNorm/LayerNorm affines random "
                 "(1 + 0.1 N(0,1), 0.1 N(0,1)). Only the UNet (no VAE, text encoder or scheduler)."),
    })
    return back


def cn_residuals(cn, sample, t, ehs, cond, scale, added=None):
    kw = {"added_cond_kwargs": added} if added is not None else {}
    with torch.no_grad():
        o = cn(sample, t, encoder_hidden_states=ehs, controlnet_cond=cond, conditioning_scale=scale,
               guess_mode=False, return_dict=True, **kw)
    return list(o.down_block_res_samples), o.mid_block_res_sample


def controlnet_unet_golden(out: Out, tag: str, unet, cn, cn_rel: str, unet_rel: str, seed: int):
    cad = unet.config.cross_attention_dim
    lat = unet.config.sample_size
    factor = 2 ** (len(cn.config.conditioning_embedding_out_channels) - 1)
    xl = unet.config.addition_embed_type == "text_time"
    case_defs = [(1.0, 421.0, 0), (0.5, 421.0, 0), (1.3, 901.0, 1)]
    t = {}
    cases = []
    unet64, cn64 = copy.deepcopy(unet).double(), copy.deepcopy(cn).double()
    for i, (scale, ts, inp_set) in enumerate(case_defs):
        s = seed + 10 * inp_set
        inp = {"sample": randn(s, 2, 4, lat, lat), "timestep": torch.tensor([ts], dtype=torch.float32),
               "encoder_hidden_states": randn(s + 1, 2, 8, cad),
               "controlnet_cond": rand(s + 2, 2, 3, lat * factor, lat * factor)}
        if xl:
            inp["text_embeds"] = randn(s + 3, 2, unet.config.projection_class_embeddings_input_dim
                                       - 6 * unet.config.addition_time_embed_dim)
            inp["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(2, 6).contiguous()

        def run(u, c, dtype):
            added = ({"text_embeds": inp["text_embeds"].to(dtype), "time_ids": inp["time_ids"].to(dtype)}
                     if xl else None)
            x, tt, e, cc = (inp[k].to(dtype) for k in ("sample", "timestep", "encoder_hidden_states",
                                                       "controlnet_cond"))
            downs, mid = cn_residuals(c, x, tt, e, cc, scale, added)
            kw = {"added_cond_kwargs": added} if xl else {}
            with torch.no_grad():
                y = u(x, tt, encoder_hidden_states=e, down_block_additional_residuals=downs,
                      mid_block_additional_residual=mid, **kw).sample
                y0 = u(x, tt, encoder_hidden_states=e, **kw).sample
            return downs, mid, y, y0

        downs, mid, y, y0 = run(unet, cn, torch.float32)
        d64, m64, y64, _ = run(unet64, cn64, torch.float64)
        p = f"case{i}."
        for k, v in inp.items():
            t[p + "input." + k] = v
        for k, v in enumerate(downs):
            t[p + f"out.down.{k}"] = v
        t[p + "out.mid"] = mid
        t[p + "out.unet"] = y
        t[p + "out.unet_no_control"] = y0
        cases.append({
            "tensor_prefix": p, "conditioning_scale": scale, "timestep": ts, "num_down_residuals": len(downs),
            "down_shapes": [list(v.shape) for v in downs], "mid_shape": list(mid.shape),
            "f64_max_abs_diff_residuals": max(mad(a, b) for a, b in zip(downs + [mid], d64 + [m64])),
            "f64_max_abs_diff_unet": mad(y, y64),
            "max_abs_unet_vs_no_control": mad(y, y0),
            "residual_absmax": max(float(v.abs().max()) for v in downs + [mid]),
        })
    info = {
        "kind": "controlnet_unet", "models": {"unet": unet_rel, "controlnet": cn_rel},
        "sdxl": xl, "cases": cases, "controlnet_conditioning_downsampling": factor, "guess_mode": False,
        "note": ("Per case (prefix caseN.): input.sample (2,4,h,w) NCHW latents; input.timestep (1,) broadcast; "
                 "input.encoder_hidden_states (2,8,cross_attention_dim); input.controlnet_cond (2,3,H,W) pixels in "
                 "[0,1] at the latent size times the downsampling (no normalisation); "
                 + ("input.text_embeds (2,40), input.time_ids (2,6) = [64,64,0,0,64,64] (added_cond_kwargs for BOTH "
                    "the ControlNet and the UNet); " if xl else "")
                 + "out.down.k = ControlNetModel down_block_res_samples[k] (already times conditioning_scale), "
                 "out.mid = mid_block_res_sample (times conditioning_scale); out.unet = UNet(sample, t, ehs, "
                 "down_block_additional_residuals=out.down.*, mid_block_additional_residual=out.mid).sample; "
                 "out.unet_no_control = the same UNet call without residuals. The down residual k is added to "
                 "the k-th skip (down-block output state) before the up blocks consume it; mid to the mid block's "
                 "output."),
    }
    out.tensors(f"controlnet_{tag}.safetensors", t, info)


# ------------------------------------------------------------------------------------------
# StyleAligned (ComfyUI node math with an explicit per-row plan), restricted to UNet levels
# ------------------------------------------------------------------------------------------
ADAIN_EPS = 1e-5
SA_OPTIONS = {"flavour": "comfy", "share_norm": "both", "share_attn": "q+k", "scale": 1.0, "layout": "halves"}


def set_plan(n_images: int, gain: float = 1.0) -> dict:
    """The service's plan for one StyleAligned set of n images in a CFG batch [uncond x n | cond x n]:
    row 0 of each half is the reference; gain 1 for reference rows, `gain` for the others."""
    src = [0 if i < n_images else n_images for i in range(2 * n_images)]
    gains = [1.0 if src[i] == i else float(gain) for i in range(2 * n_images)]
    return {"reference_of": src, "gain": gains, "value_reference_of": list(src), "stats_reference_of": list(src)}


def _ref(x: torch.Tensor, src: list, gains: list | None = None) -> torch.Tensor:
    out = x[torch.tensor(src)]
    if gains is not None and any(g != 1.0 for g in gains):
        out = out * torch.tensor(gains, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return out


def _adain(x: torch.Tensor, src: list) -> torch.Tensor:
    mean = x.mean(dim=-2, keepdim=True)
    std = torch.sqrt(x.var(dim=-2, keepdim=True, unbiased=True) + ADAIN_EPS)
    return (x - mean) / std * _ref(std, src) + _ref(mean, src)


def _mha(q, k, v, heads: int, scale: float):
    b, nq, c = q.shape
    nk = k.shape[1]
    d = c // heads
    qh = q.reshape(b, nq, heads, d).transpose(1, 2)
    kh = k.reshape(b, nk, heads, d).transpose(1, 2)
    vh = v.reshape(b, nk, heads, d).transpose(1, 2)
    probs = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(probs, vh).transpose(1, 2).reshape(b, nq, c)


class NodeProcessor:
    """attn1 processor, ComfyUI node math (see the refharness README): AdaIN on the attn1 INPUT for
    q / k ('q' / 'k' / 'v' in share_attn), keys and values extended with the reference row's tokens
    (keys times gain)."""

    def __init__(self, opts: dict, plan: dict):
        self.opts, self.plan = opts, plan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3
        x, sa, p = hidden_states, self.opts["share_attn"], self.plan
        if x.shape[0] != len(p["reference_of"]):
            raise ValueError("plan does not match the batch")
        q_in = _adain(x, p["stats_reference_of"]) if "q" in sa else x
        k_in = _adain(x, p["stats_reference_of"]) if "k" in sa else x
        v_in = _adain(x, p["stats_reference_of"]) if "v" in sa else x
        k_in = torch.cat([k_in, _ref(k_in, p["reference_of"], p["gain"])], dim=-2)
        v_in = torch.cat([v_in, _ref(v_in, p["value_reference_of"])], dim=-2)
        out = _mha(attn.to_q(q_in), attn.to_k(k_in), attn.to_v(v_in), attn.heads, attn.scale)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def unet_levels(unet) -> dict:
    """level name -> module: down.k = down_blocks[k], mid = mid_block, up.k = up_blocks[k],
    out = conv_norm_out (the UNet's last GroupNorm)."""
    lv = {f"down.{k}": b for k, b in enumerate(unet.down_blocks)}
    lv["mid"] = unet.mid_block
    lv.update({f"up.{k}": b for k, b in enumerate(unet.up_blocks)})
    lv["out"] = unet.conv_norm_out
    return lv


class SAPatch:
    """StyleAligned on a diffusers UNet, limited to chosen levels: every attn1 and every GroupNorm inside
    a chosen level is patched (shared GroupNorm: statistics over the row and its reference row together).
    Shared LayerNorm is a no-op (LayerNorm normalises each token alone), so it is not installed.
    on()/off() swap the processors and norm forwards (used per step for step windows)."""

    def __init__(self, unet, opts: dict, plan: dict, levels: list | None = None):
        self.unet, self.opts, self.plan = unet, opts, plan
        lv = unet_levels(unet)
        self.levels = list(lv) if levels is None else list(levels)
        assert all(name in lv for name in self.levels), self.levels
        names = {}
        for name in self.levels:
            m = lv[name]
            for sub_name, sub in ([("", m)] + list(m.named_modules()) if name == "out" else m.named_modules()):
                names[id(sub)] = sub
        self.groupnorms = [m for m in names.values() if isinstance(m, nn.GroupNorm)]
        self.attn1 = [m for n, m in unet.named_modules() if n.endswith(".attn1") and id(m) in names]
        self.active = False
        self._old = {}

    def set_plan(self, plan: dict):
        self.plan = plan
        if self.active:
            self.off()
            self.on()

    def on(self):
        if self.active:
            return
        share_gn = self.opts["share_norm"] in ("both", "group")
        for a in self.attn1:
            self._old[id(a)] = a.processor
            a.set_processor(NodeProcessor(self.opts, self.plan))
        if share_gn:
            src = self.plan["stats_reference_of"]
            for g in self.groupnorms:
                orig = type(g).forward.__get__(g)

                def fwd(x, orig=orig, src=src):
                    n = x.shape[-2]
                    return orig(torch.cat([x, _ref(x, src)], dim=-2))[..., :n, :]
                g.forward = fwd
        self.active = True

    def off(self):
        if not self.active:
            return
        for a in self.attn1:
            a.set_processor(self._old.pop(id(a)))
        for g in self.groupnorms:
            g.__dict__.pop("forward", None)
        self.active = False


def window_active(i: int, n: int, start: float, end: float) -> bool:
    """diffusers' control_guidance_start/end rule: active at step i of n iff not (i/n < start or (i+1)/n > end)."""
    return not (i / n < start or (i + 1) / n > end)


def crosscheck(refharness: Path) -> int:
    """This script's patch (all levels) vs the refharness sa_ref.apply_comfy on one CFG UNet call per
    option set, for both tiny UNets; and the level partition. Prints, returns 0 if all equal."""
    sys.path.insert(0, str(refharness))
    import sa_ref  # our team's reference StyleAligned implementation
    bad = 0
    for name, comps in (("tiny_sd15", load_sd15(GOLDENS)), ("tiny_sdxl_pipe", load_sdxl(GOLDENS))):
        unet = comps["unet"]
        lv = unet_levels(unet)
        gn_all = {id(m) for m in unet.modules() if isinstance(m, nn.GroupNorm)}
        a1_all = {id(m) for n, m in unet.named_modules() if n.endswith(".attn1")}
        per = [SAPatch(unet, SA_OPTIONS, set_plan(3), [lname]) for lname in lv]
        gn_cnt = sum(len(p.groupnorms) for p in per)
        a1_cnt = sum(len(p.attn1) for p in per)
        part_ok = (gn_cnt == len(gn_all) and a1_cnt == len(a1_all)
                   and set().union(*[{id(m) for m in p.groupnorms} for p in per]) == gn_all
                   and set().union(*[{id(m) for m in p.attn1} for p in per]) == a1_all)
        print(f"{name}: levels {list(lv)}: GroupNorms {gn_cnt}/{len(gn_all)}, attn1 {a1_cnt}/{len(a1_all)}, "
              f"partition {'OK' if part_ok else 'BROKEN'}")
        bad += not part_ok
        hw = unet.config.sample_size
        x = randn(1, 3, 4, hw, hw)
        x = torch.cat([x, x])
        ehs = randn(2, 6, 8, unet.config.cross_attention_dim)
        kw = {}
        if unet.config.addition_embed_type == "text_time":
            kw["added_cond_kwargs"] = {"text_embeds": randn(3, 6, unet.config.projection_class_embeddings_input_dim
                                                            - 6 * unet.config.addition_time_embed_dim),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0, 0, 64, 64]]).expand(6, 6)}
        for sn, sa, sc in (("both", "q+k", 1.0), ("both", "q+k+v", 0.5), ("disabled", "disabled", 0.0),
                           ("group", "q+k", 0.7)):
            opts = dict(SA_OPTIONS, share_norm=sn, share_attn=sa, scale=sc)
            p = SAPatch(unet, opts, set_plan(3, sc))
            p.on()
            with torch.no_grad():
                a = unet(x, 501, encoder_hidden_states=ehs, **kw).sample
            p.off()
            h = sa_ref.apply_comfy(unet, sn, sa, sc, layout="halves")
            with torch.no_grad():
                b = unet(x, 501, encoder_hidden_states=ehs, **kw).sample
            h.remove()
            d = mad(a, b)
            print(f"{name}: share_norm={sn} share_attn={sa} scale={sc}: this patch vs sa_ref.apply_comfy "
                  f"max abs {d:.3g}")
            bad += d != 0.0
    print("CROSSCHECK OK" if not bad else f"CROSSCHECK FAILED ({bad})")
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------
# the manual set loop (shared by the pipe goldens)
# ------------------------------------------------------------------------------------------
def make_scheduler(kind: str, config: dict):
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if kind == "ddim":
        return DDIMScheduler.from_config(cfg)
    if kind == "euler":
        return EulerDiscreteScheduler.from_config(cfg)
    if kind == "dpmpp_2m_karras":
        from diffusers import DPMSolverMultistepScheduler
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=True)
    raise ValueError(kind)


def scheduler_info(s) -> dict:
    # JSON has no infinities (DPMSolverMultistep's lambda_min_clipped is -inf): those become strings.
    def js(v):
        return str(v) if isinstance(v, float) and not math.isfinite(v) else v
    return {"class": type(s).__name__, "config": {k: js(v) for k, v in dict(s.config).items() if not k.startswith("_")}}


def token_ids(seed: int, n: int, seq: int, bos: int, eos: int, lengths) -> torch.Tensor:
    g = gen(seed)
    rows = []
    for ln in lengths:
        ids = [bos] + torch.randint(1, bos, (ln,), generator=g).tolist() + [eos]
        rows.append((ids + [eos] * seq)[:seq])
    return torch.tensor(rows, dtype=torch.int64)


def set_loop(unet, sched, steps: int, entry: list, cfg: float, ehs_u, ehs_c, patch: SAPatch | None,
             sa_on=lambda i: True, control=None, added_u=None, added_c=None, on_step=None):
    """One StyleAligned set through a CFG loop, rows entering at their own step.

    entry[r] = (step, latent (C,H,W)): row r joins the batch at that step with that latent. The loop starts
    at the smallest entry step s0 (the scheduler's begin index set to s0 as diffusers' img2img does).
    At step i the UNet batch is [x_present | x_present] with [ehs_u_present | ehs_c_present] (SDXL: the
    added_cond_kwargs the same way); the plan is the service's plan over the present rows (row 0 of each
    half = reference). The patch is on at step i iff sa_on(i). control(i, t, x_in, ehs, rows, added) ->
    (downs, mid) or None adds ControlNet residuals. Returns latents_steps (n+1, B, ...) (index k = the
    latents entering step k, joined rows included; n = after the last step) and noise_pred_steps
    (n, B, ...) (guided eps), both with zeros for rows not yet present."""
    sched.set_timesteps(steps)
    s0 = min(st for st, _ in entry)
    if s0 > 0 and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(s0 * sched.order)
    multistep = hasattr(sched, "model_outputs")
    group_scheds = {}
    for st in sorted({st for st, _ in entry}):
        gs = copy.deepcopy(sched)
        gs.set_timesteps(steps)
        if st > 0 and hasattr(gs, "set_begin_index"):
            gs.set_begin_index(st * gs.order)
        group_scheds[st] = gs
    b = len(entry)
    shape = entry[0][1].shape
    dt = entry[0][1].dtype
    x = torch.zeros(b, *shape, dtype=dt)
    present = [False] * b
    lat_steps = [torch.zeros(b, *shape, dtype=dt) for _ in range(s0)]
    eps_steps = [torch.zeros(b, *shape, dtype=dt) for _ in range(s0)]
    for i in range(s0, steps):
        t = sched.timesteps[i]
        for r, (st, lat) in enumerate(entry):
            if st == i:
                x[r] = lat
                present[r] = True
        lat_steps.append(x.clone())
        rows = [r for r in range(b) if present[r]]
        xp = x[rows]
        x_in = sched.scale_model_input(torch.cat([xp, xp]), t)
        e = torch.cat([ehs_u[rows], ehs_c[rows]])
        kw = {}
        if added_u is not None:
            kw["added_cond_kwargs"] = {k: torch.cat([added_u[k][rows], added_c[k][rows]]) for k in added_u}
        if control is not None:
            res = control(i, t, x_in, e, rows, kw.get("added_cond_kwargs"))
            if res is not None:
                kw["down_block_additional_residuals"], kw["mid_block_additional_residual"] = res
        if patch is not None:
            patch.set_plan(set_plan(len(rows), patch.opts["scale"]))
            (patch.on if sa_on(i) else patch.off)()
        with torch.no_grad():
            out = unet(x_in, t, encoder_hidden_states=e, **kw).sample
        if patch is not None:
            patch.off()
        eu, ec = out.chunk(2)
        eps = eu + cfg * (ec - eu)
        if multistep:
            # A multistep scheduler keeps a history per row group: each entry step's rows are
            # stepped by their own scheduler, begun at that step (as an img2img pipeline begins
            # there); stepping the present rows together would mix histories of different lengths.
            xp = xp.clone()
            for st, gs in group_scheds.items():
                idx = [k for k, r in enumerate(rows) if entry[r][0] == st]
                if idx:
                    xp[idx] = gs.step(eps[idx], t, xp[idx]).prev_sample
        else:
            xp = sched.step(eps, t, xp).prev_sample
        full_eps = torch.zeros(b, *shape, dtype=dt)
        full_eps[rows] = eps
        x[rows] = xp
        eps_steps.append(full_eps)
    lat_steps.append(x.clone())
    return torch.stack(lat_steps), torch.stack(eps_steps)


def f64(m):
    """A float64 copy of a module (for the f32-vs-f64 noise floor)."""
    return copy.deepcopy(m).double()


def d64(x):
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: v.double() for k, v in x.items()}
    return x.double()


def f64_floor(xs: torch.Tensor, xs64: torch.Tensor) -> dict:
    return {"f64_max_abs_diff_latents_steps": [mad(a, b) for a, b in zip(xs, xs64)],
            "f64_max_abs_diff_latents_final": mad(xs[-1], xs64[-1])}


def sched_tensors(sched, steps: int, prefix: str) -> dict:
    s = copy.deepcopy(sched)
    s.set_timesteps(steps)
    t = {prefix + "timesteps": s.timesteps.to(torch.int64), prefix + "timesteps_f32": s.timesteps.to(torch.float32)}
    if isinstance(s, DDIMScheduler):
        step = s.config.num_train_timesteps // steps
        acp = s.alphas_cumprod
        t[prefix + "alpha_prod_t"] = torch.stack([acp[int(x)] for x in s.timesteps]).to(torch.float32)
        t[prefix + "alpha_prod_t_prev"] = torch.stack(
            [acp[int(x) - step] if int(x) - step >= 0 else s.final_alpha_cumprod for x in s.timesteps]).to(torch.float32)
    else:
        t[prefix + "sigmas"] = s.sigmas.to(torch.float32)
    return t


def sd15_text(te, seed: int, n: int) -> tuple:
    """[uncond x n | cond x n] token ids (16 positions, BOS 998, EOS = pad 999) and CLIP embeddings."""
    cfg = te.config
    seq = cfg.max_position_embeddings
    ids = token_ids(seed, 2 * n, seq, cfg.bos_token_id, cfg.eos_token_id, [0] * n + [4 + 3 * k for k in range(n)])
    with torch.no_grad():
        ehs = te(ids).last_hidden_state
    return ids, ehs


def sd15_pipe_kwargs(c: dict, sched) -> dict:
    return dict(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=None, unet=c["unet"], scheduler=sched,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def capture_steps():
    got = []

    def cb(pipe, i, t, kw):
        got.append(kw["latents"].clone())
        return kw
    return got, cb


# ------------------------------------------------------------------------------------------
# img2img targets
# ------------------------------------------------------------------------------------------
IMG2IMG_CASES = [("ddim", 8, 0.6), ("euler", 8, 0.75), ("dpmpp_2m_karras", 8, 0.5)]
CFG_SD15 = 7.0


def img2img_golden(out: Out, c: dict):
    from diffusers import StableDiffusionImg2ImgPipeline
    seed = SEEDS["img2img"]
    unet, vae = c["unet"], c["vae"]
    n = 3
    ids, ehs = sd15_text(c["text_encoder"], seed, n)
    ehs_u, ehs_c = ehs[:n], ehs[n:]
    lat_hw = unet.config.sample_size
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    noise_ref = randn(seed + 1, 1, 4, lat_hw, lat_hw)
    noise_tg = randn(seed + 2, n - 1, 4, lat_hw, lat_hw)   # = what the img2img pipeline draws with gen(seed+2)
    noise = torch.cat([noise_ref, noise_tg])
    # smooth-ish init images in [0,1]: upsampled random colours plus fine noise
    img = (torch.nn.functional.interpolate(rand(seed + 3, n - 1, 3, 4, 4), scale_factor=lat_hw * f // 4,
                                           mode="bilinear", align_corners=False)
           * 0.8 + 0.2 * rand(seed + 4, n - 1, 3, lat_hw * f, lat_hw * f)).clamp(0, 1)
    with torch.no_grad():
        # contiguous: the VAE's conv output has channels-last strides, which would make later UNet calls on
        # it take other kernels (last-bit differences)
        init_lat = (vae.encode(img * 2 - 1).latent_dist.mean * vae.config.scaling_factor).contiguous()
    t = {"input_ids": ids, "encoder_hidden_states": ehs, "noise": noise, "init_image": img, "init_latents": init_lat}
    unet64 = f64(unet)
    cases = []
    for ci, (kind, steps, strength) in enumerate(IMG2IMG_CASES):
        p = f"case{ci}."
        base = make_scheduler(kind, c["scheduler_config"])
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        s = copy.deepcopy(base)
        s.set_timesteps(steps)
        ts = s.timesteps
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(t_start * s.order)
        entry_lat = s.add_noise(init_lat, noise_tg, ts[t_start:t_start + 1].repeat(n - 1))
        # After set_timesteps, as diffusers' pipelines scale their initial noise (Euler's depends on it).
        ref_init = noise_ref[0] * s.init_noise_sigma
        entry = [(0, ref_init)] + [(t_start, entry_lat[k]) for k in range(n - 1)]
        patch = SAPatch(unet, SA_OPTIONS, set_plan(n))
        xs, eps = set_loop(unet, copy.deepcopy(base), steps, entry, CFG_SD15, ehs_u, ehs_c, patch)
        xs_plain, _ = set_loop(unet, copy.deepcopy(base), steps, entry, CFG_SD15, ehs_u, ehs_c, None)
        floor = {"f64_max_abs_diff_latents_steps": None, "f64_max_abs_diff_latents_final": None}
        if kind == "ddim":   # diffusers' Euler step computes in float32 internally: no f64 reference for it
            s64 = copy.deepcopy(base)
            s64.set_timesteps(steps)
            e64 = s64.add_noise(init_lat.double(), noise_tg.double(), ts[t_start:t_start + 1].repeat(n - 1))
            entry64 = [(0, ref_init.double())] + [(t_start, e64[k]) for k in range(n - 1)]
            xs64, _ = set_loop(unet64, copy.deepcopy(base), steps, entry64, CFG_SD15, ehs_u.double(), ehs_c.double(),
                               SAPatch(unet64, SA_OPTIONS, set_plan(n)))
            floor = f64_floor(xs, xs64)
        # diffusers' StableDiffusionImg2ImgPipeline on the two target rows, no StyleAligned, same noise
        pipe = StableDiffusionImg2ImgPipeline(**sd15_pipe_kwargs(c, copy.deepcopy(base)))
        pipe.set_progress_bar_config(disable=True)
        got, cb = capture_steps()
        with torch.no_grad():
            lat_pipe = pipe(prompt_embeds=ehs_c[1:], negative_prompt_embeds=ehs_u[1:], image=init_lat,
                            strength=strength, num_inference_steps=steps, guidance_scale=CFG_SD15,
                            generator=gen(seed + 2), output_type="latent", callback_on_step_end=cb).images
        tg_only, _ = set_loop(unet, copy.deepcopy(base), steps, [(t_start, entry_lat[k]) for k in range(n - 1)],
                              CFG_SD15, ehs_u[1:], ehs_c[1:], None)
        pipe_diff = max([mad(lat_pipe, tg_only[-1])] + [mad(g, tg_only[t_start + 1 + k]) for k, g in enumerate(got)])
        final = xs[-1]
        with torch.no_grad():
            image = vae.decode(final / vae.config.scaling_factor).sample
        t.update(sched_tensors(base, steps, p))
        t.update({p + "entry_latents": entry_lat, p + "latents_init_reference": ref_init[None],
                  p + "latents_steps": xs, p + "noise_pred_steps": eps, p + "latents_final": final.clone(),
                  p + "latents_final_unpatched": xs_plain[-1], p + "image_decoded": image})
        cases.append({
            **floor,
            "tensor_prefix": p, "scheduler": scheduler_info(base), "scheduler_kind": kind, "steps": steps,
            "strength": strength, "init_timestep": init_timestep, "t_start": t_start,
            "entry_timestep": int(ts[t_start]), "init_noise_sigma": float(s.init_noise_sigma),
            "target_rows": list(range(1, n)), "reference_rows": [0],
            "manual_vs_diffusers_img2img_pipeline_targets_only_max_abs": pipe_diff,
            "reference_alone_patched_vs_unpatched_max_abs":
                (mad(xs[t_start][0], xs_plain[t_start][0]) if t_start else None),
            "max_abs_patched_vs_unpatched_final": mad(final, xs_plain[-1]),
            "latents_final_std": float(final.std()),
        })
        print(f"img2img case{ci} {kind}: t_start {t_start} pipe diff {pipe_diff:.3g} "
              f"vs unpatched {cases[-1]['max_abs_patched_vs_unpatched_final']:.3g}", flush=True)
    info = {
        "kind": "img2img_pipe", "models": {"unet": f"{SD15}/unet", "vae": f"{SD15}/vae",
                                           "text_encoder": f"{SD15}/text_encoder"},
        "n_images": n, "cfg_batch": 2 * n, "guidance_scale": CFG_SD15, "eta": 0.0,
        "stylealigned": dict(SA_OPTIONS, **set_plan(n)), "cases": cases,
        "vae_scaling_factor": vae.config.scaling_factor,
        "note": ("One StyleAligned set of 3 images: row 0 = reference, generated from pure noise over the full "
                 "schedule (latents_init_reference = noise[0] * init_noise_sigma); rows 1, 2 = img2img targets. "
                 "init_latents = vae.encode(init_image * 2 - 1).latent_dist.mean * scaling_factor (deterministic, no "
                 "sampling). Schedule cut as StableDiffusionImg2ImgPipeline.get_timesteps: init_timestep = "
                 "min(int(steps*strength), steps), t_start = steps - init_timestep; targets enter at step t_start "
                 "with entry_latents = scheduler.add_noise(init_latents, noise[1:], timesteps[t_start]) (DDIM: "
                 "sqrt(a)x + sqrt(1-a)n; Euler: x + sigmas[t_start] n). Steps 0..t_start-1 run the reference row "
                 "alone: UNet batch [ref_u | ref_c], plan reference_of [0, 1] (itself; equals unpatched up to "
                 "rounding, see reference_alone_patched_vs_unpatched_max_abs). From t_start on the batch is "
                 "[uncond x3 | cond x3] with the plan in `stylealigned` (reference rows 0 and 3). ehs rows = "
                 "[uncond x3 | cond x3] = CLIP(input_ids).last_hidden_state. Per case (prefix caseN.): timesteps "
                 "(int64, the full n-step schedule), timesteps_f32, alpha_prod_t/alpha_prod_t_prev (DDIM) or sigmas "
                 "(Euler, n+1); latents_steps (n+1, 3, 4, 16, 16): index k = latents entering step k (the target rows "
                 "are ZERO for k < t_start and = entry_latents at k = t_start), index n = after the last step; "
                 "noise_pred_steps (n, 3, ...) guided eps (zero rows where absent); latents_final; "
                 "latents_final_unpatched (same loop without StyleAligned); image_decoded = "
                 "vae.decode(latents_final / scaling_factor) raw (before /2+0.5 clamp). UNet input per step = "
                 "scheduler.scale_model_input(cat[x, x], t) (Euler: / sqrt(sigma^2+1))."),
    }
    out.tensors("img2img_sd15.safetensors", t, info)


# ------------------------------------------------------------------------------------------
# StyleAligned per step window and per UNet level
# ------------------------------------------------------------------------------------------
WINDOW_STEPS = 8
WINDOW_CASES = [  # (window start, end, levels or None = all)
    (0.25, 0.75, None),
    (0.0, 0.5, None),
    (0.0, 1.0, ["up.1", "up.2", "out"]),
    (0.0, 1.0, ["down.0", "down.1", "mid"]),
    (0.3, 1.0, ["down.2", "mid", "up.0"]),
]


def run_sd15_pipeline(c: dict, sched, lat0, ehs_u, ehs_c, steps: int, patch: SAPatch | None, sa_on):
    """diffusers' StableDiffusionPipeline.__call__ with the same latents and embeddings; the patch is
    switched per step from callback_on_step_end (the state for step i+1 is set at the end of step i)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(**sd15_pipe_kwargs(c, sched))
    pipe.set_progress_bar_config(disable=True)
    got = []

    def cb(p, i, t, kw):
        got.append(kw["latents"].clone())
        if patch is not None:
            patch.off()
            if i + 1 < steps and sa_on(i + 1):
                patch.on()
        return kw
    if patch is not None and sa_on(0):
        patch.on()
    with torch.no_grad():
        lat = pipe(prompt_embeds=ehs_c, negative_prompt_embeds=ehs_u, latents=lat0.clone(), num_inference_steps=steps,
                   guidance_scale=CFG_SD15, output_type="latent", callback_on_step_end=cb).images
    if patch is not None:
        patch.off()
    return lat, got


def style_window_golden(out: Out, c: dict):
    seed = SEEDS["window"]
    unet, vae = c["unet"], c["vae"]
    n = 3
    steps = WINDOW_STEPS
    ids, ehs = sd15_text(c["text_encoder"], seed, n)
    ehs_u, ehs_c = ehs[:n], ehs[n:]
    hw = unet.config.sample_size
    base = make_scheduler("ddim", c["scheduler_config"])
    noise = randn(seed + 1, n, 4, hw, hw)
    lat0 = noise * base.init_noise_sigma
    entry = [(0, lat0[r]) for r in range(n)]
    t = {"input_ids": ids, "encoder_hidden_states": ehs, "latents_init": lat0}
    t.update(sched_tensors(base, steps, ""))
    all_levels = list(unet_levels(unet))

    def run(levels, start, end, prefix):
        patch = SAPatch(unet, SA_OPTIONS, set_plan(n), levels) if levels != "none" else None
        on = (lambda i: window_active(i, steps, start, end))
        xs, eps = set_loop(unet, copy.deepcopy(base), steps, entry, CFG_SD15, ehs_u, ehs_c, patch, sa_on=on)
        lat_pipe, got = run_sd15_pipeline(c, copy.deepcopy(base), lat0, ehs_u, ehs_c, steps, patch, on)
        pipe_diff = max([mad(lat_pipe, xs[-1])] + [mad(g, xs[k + 1]) for k, g in enumerate(got)])
        with torch.no_grad():
            image = vae.decode(xs[-1] / vae.config.scaling_factor).sample
        t.update({prefix + "latents_steps": xs, prefix + "noise_pred_steps": eps,
                  prefix + "latents_final": xs[-1].clone(), prefix + "image_decoded": image})
        return xs, patch, pipe_diff

    unet64 = f64(unet)
    entry64 = [(0, lat0[r].double()) for r in range(n)]

    def floor_of(levels, start, end):
        patch = SAPatch(unet64, SA_OPTIONS, set_plan(n), levels)
        xs64, _ = set_loop(unet64, copy.deepcopy(base), steps, entry64, CFG_SD15, ehs_u.double(), ehs_c.double(), patch,
                           sa_on=lambda i: window_active(i, steps, start, end))
        return xs64

    xs_full, _, d_full = run(None, 0.0, 1.0, "full.")
    xs_none, _, d_none = run("none", 0.0, 1.0, "unpatched.")
    cases = []
    for ci, (start, end, levels) in enumerate(WINDOW_CASES):
        p = f"case{ci}."
        xs, patch, pipe_diff = run(levels, start, end, p)
        active = [window_active(i, steps, start, end) for i in range(steps)]
        cases.append({
            **f64_floor(xs, floor_of(levels, start, end)),
            "tensor_prefix": p, "window": [start, end], "levels": list(patch.levels),
            "levels_all": levels is None, "active_steps": active,
            "patched_groupnorms": len(patch.groupnorms), "patched_attn1": len(patch.attn1),
            "manual_vs_diffusers_pipeline_max_abs": pipe_diff,
            "max_abs_vs_full_patch_final": mad(xs[-1], xs_full[-1]),
            "max_abs_vs_unpatched_final": mad(xs[-1], xs_none[-1]),
        })
        print(f"window case{ci} [{start},{end}] {levels}: active {sum(active)} pipe diff {pipe_diff:.3g} "
              f"vs full {cases[-1]['max_abs_vs_full_patch_final']:.3g} "
              f"vs unpatched {cases[-1]['max_abs_vs_unpatched_final']:.3g}", flush=True)
    lv_members = {}
    for name in all_levels:
        pp = SAPatch(unet, SA_OPTIONS, set_plan(n), [name])
        lv_members[name] = {"groupnorms": len(pp.groupnorms), "attn1": len(pp.attn1)}
    info = {
        "kind": "style_window_pipe", "models": {"unet": f"{SD15}/unet", "vae": f"{SD15}/vae",
                                                "text_encoder": f"{SD15}/text_encoder"},
        "n_images": n, "cfg_batch": 2 * n, "guidance_scale": CFG_SD15, "eta": 0.0, "steps": steps,
        "scheduler": scheduler_info(base), "stylealigned": dict(SA_OPTIONS, **set_plan(n)),
        "level_names": all_levels, "level_members": lv_members, "cases": cases,
        "full": {"tensor_prefix": "full.", "window": [0.0, 1.0], "levels": all_levels,
                 "manual_vs_diffusers_pipeline_max_abs": d_full},
        "unpatched": {"tensor_prefix": "unpatched.", "manual_vs_diffusers_pipeline_max_abs": d_none},
        "window_rule": "patch active at step i (0-based, n steps) iff not (i/n < start or (i+1)/n > end)",
        "level_rule": ("level 'down.k' = unet.down_blocks[k], 'mid' = unet.mid_block, 'up.k' = unet.up_blocks[k]: "
                       "every GroupNorm and every attn1 inside that block belongs to it; 'out' = unet.conv_norm_out. "
                       "A patched level gets the StyleAligned attn1 processor on its attn1 layers and the shared "
                       "GroupNorm on its GroupNorms; all other layers run plain."),
        "note": ("DDIM (eta 0) CFG loop of one StyleAligned set of 3 images (row 0 reference) from latents_init "
                 "(noise, init_noise_sigma 1). UNet batch [uncond x3 | cond x3] with encoder_hidden_states = "
                 "CLIP(input_ids).last_hidden_state (rows in that order); eps = eps_u + 7 (eps_c - eps_u). At step i "
                 "the patch (options and plan in `stylealigned`) is on iff window_rule holds, on the case's levels "
                 "only. Shared tensors: timesteps (8,) int64, timesteps_f32, alpha_prod_t, alpha_prod_t_prev. Per "
                 "prefix (caseN., full. = window [0,1] all levels, unpatched. = no patch): latents_steps (9,3,4,16,16) "
                 "([0] = latents_init, [k+1] after step k), noise_pred_steps (8,3,4,16,16) guided eps, latents_final, "
                 "image_decoded = vae.decode(latents_final / 0.18215) raw. manual_vs_diffusers_pipeline_max_abs: "
                 "StableDiffusionPipeline.__call__ with the same latents/embeddings and the patch switched per step "
                 "from callback_on_step_end."),
    }
    out.tensors("style_window_sd15.safetensors", t, info)


# ------------------------------------------------------------------------------------------
# ControlNet on the target rows of a StyleAligned set
# ------------------------------------------------------------------------------------------
CN_PIPE_STEPS = 8
CN_PIPE_CASES = [(1.0, 0.0, 1.0), (0.8, 0.2, 0.8)]   # (conditioning_scale, control_guidance_start, end)
CFG_SDXL = 5.0


def reference_rows(batch: int) -> list:
    """Rows of a CFG batch [uncond x n | cond x n] of one set that are references (0 and n)."""
    return [0, batch // 2]


def zero_rows(downs, mid, rows):
    idx = torch.tensor(rows)
    downs = [d.index_fill(0, idx, 0.0) for d in downs]
    return downs, mid.index_fill(0, idx, 0.0)


def make_control(cn, control_full, steps: int, scale: float, start: float, end: float, record=None):
    """The ControlNet as the set loop calls it: on the whole CFG batch (control_full[r] per image row,
    zeros for the reference row), conditioning_scale * keep(i) as diffusers, then the reference rows'
    residuals set to zero (the ControlNet acts on the targets only)."""
    def control(i, t, x_in, e, rows, added):
        keep = 1.0 - float(i / steps < start or (i + 1) / steps > end)
        cond = torch.cat([control_full[rows], control_full[rows]])
        kw = {"added_cond_kwargs": added} if added is not None else {}
        with torch.no_grad():
            downs, mid = cn(x_in, t, encoder_hidden_states=e, controlnet_cond=cond, conditioning_scale=scale * keep,
                            guess_mode=False, return_dict=False, **kw)
        downs, mid = zero_rows(list(downs), mid, reference_rows(x_in.shape[0]))
        if record is not None and i == 0:
            record["downs"], record["mid"] = downs, mid
            # the same step with the ControlNet run on the target rows alone
            b = x_in.shape[0]
            tg = [r for r in range(b) if r not in reference_rows(b)]
            kt = {"added_cond_kwargs": {k: v[tg] for k, v in added.items()}} if added is not None else {}
            with torch.no_grad():
                dt, mt = cn(x_in[tg], t, encoder_hidden_states=e[tg], controlnet_cond=cond[tg],
                            conditioning_scale=scale * keep, guess_mode=False, return_dict=False, **kt)
            record["targets_only_vs_full_batch_max_abs"] = max(mad(a[tg], bb) for a, bb in zip(downs + [mid],
                                                                                             list(dt) + [mt]))
        return downs, mid
    return control


class TargetsOnlyControlNet:
    """Context manager: the pipeline's ControlNet returns zero residuals for the reference rows."""

    def __init__(self, cn):
        self.cn = cn

    def __enter__(self):
        orig = type(self.cn).forward.__get__(self.cn)

        def fwd(sample, *a, **k):
            downs, mid = orig(sample, *a, **dict(k, return_dict=False))
            return zero_rows(list(downs), mid, reference_rows(sample.shape[0]))
        self.cn.forward = fwd
        return self.cn

    def __exit__(self, *exc):
        self.cn.__dict__.pop("forward", None)


def control_images(seed: int, n: int, size: int) -> torch.Tensor:
    """n control images in [0,1]: blocky edge-map-like patterns (thresholded upsampled noise)."""
    base = torch.nn.functional.interpolate(rand(seed, n, 1, 8, 8), size=(size, size), mode="nearest")
    edges = (base > 0.5).float()
    return (edges.expand(n, 3, size, size) * 0.9 + 0.1 * rand(seed + 1, n, 3, size, size)).contiguous()


def controlnet_pipe_golden(out: Out, tag: str, c: dict, cn, cn_rel: str, text: dict, pipe_cls, pipe_kwargs: dict,
                           call_kwargs: dict, cfg: float, models: dict, seed: int, sched_kind: str):
    unet, vae = c["unet"], c["vae"]
    n = 3
    steps = CN_PIPE_STEPS
    ehs_u, ehs_c = text["ehs_u"], text["ehs_c"]
    added_u, added_c = text.get("added_u"), text.get("added_c")
    hw = unet.config.sample_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    base = make_scheduler(sched_kind, c["scheduler_config"])
    lat0 = randn(seed + 1, n, 4, hw, hw) * base.init_noise_sigma
    cimg = control_images(seed + 2, n - 1, hw * factor)
    control_full = torch.cat([torch.zeros(1, 3, hw * factor, hw * factor), cimg])
    entry = [(0, lat0[r]) for r in range(n)]
    t = dict(text["tensors"])
    t.update({"latents_init": lat0, "control_images": cimg})
    t.update(sched_tensors(base, steps, ""))
    patch = SAPatch(unet, SA_OPTIONS, set_plan(n))
    xs_nc, _ = set_loop(unet, copy.deepcopy(base), steps, entry, cfg, ehs_u, ehs_c, patch,
                        added_u=added_u, added_c=added_c)
    cases = []
    unet64, cn64 = f64(unet), f64(cn)
    entry64 = [(0, lat0[r].double()) for r in range(n)]
    for ci, (scale, start, end) in enumerate(CN_PIPE_CASES):
        p = f"case{ci}."
        rec = {}
        control = make_control(cn, control_full, steps, scale, start, end, rec if ci == 0 else None)
        xs, eps = set_loop(unet, copy.deepcopy(base), steps, entry, cfg, ehs_u, ehs_c, patch, control=control,
                           added_u=added_u, added_c=added_c)
        # diffusers' own ControlNet pipeline: same latents / embeddings / control images, the UNet patched for the
        # whole loop, the ControlNet's reference-row residuals zeroed
        pipe = pipe_cls(**pipe_kwargs, scheduler=copy.deepcopy(base))
        pipe.set_progress_bar_config(disable=True)
        got, cb = capture_steps()
        patch.set_plan(set_plan(n))
        patch.on()
        with TargetsOnlyControlNet(cn), torch.no_grad():
            lat_pipe = pipe(image=control_full, latents=lat0.clone() / base.init_noise_sigma, num_inference_steps=steps,
                            guidance_scale=cfg, controlnet_conditioning_scale=scale, control_guidance_start=start,
                            control_guidance_end=end, output_type="latent", callback_on_step_end=cb,
                            height=hw * factor, width=hw * factor, **call_kwargs).images
        patch.off()
        pipe_diff = max([mad(lat_pipe, xs[-1])] + [mad(g, xs[k + 1]) for k, g in enumerate(got)])
        xs64, _ = set_loop(unet64, copy.deepcopy(base), steps, entry64, cfg, ehs_u.double(), ehs_c.double(),
                           SAPatch(unet64, SA_OPTIONS, set_plan(n)),
                           control=make_control(cn64, control_full.double(), steps, scale, start, end),
                           added_u=d64(added_u), added_c=d64(added_c))
        with torch.no_grad():
            image = vae.decode(xs[-1] / vae.config.scaling_factor).sample
        t.update({p + "latents_steps": xs, p + "noise_pred_steps": eps, p + "latents_final": xs[-1].clone(),
                  p + "image_decoded": image})
        if ci == 0:
            for k, d in enumerate(rec["downs"]):
                t[p + f"step0.down.{k}"] = d
            t[p + "step0.mid"] = rec["mid"]
        active = [window_active(i, steps, start, end) for i in range(steps)]
        cases.append({
            **f64_floor(xs, xs64),
            "tensor_prefix": p, "conditioning_scale": scale, "control_guidance_start": start,
            "control_guidance_end": end, "control_active_steps": active,
            "step0_residuals_stored": ci == 0, "num_down_residuals": len(rec["downs"]) if ci == 0 else None,
            "step0_controlnet_on_targets_alone_vs_full_batch_max_abs": rec.get("targets_only_vs_full_batch_max_abs"),
            "manual_vs_diffusers_pipeline_max_abs": pipe_diff,
            "max_abs_vs_no_control_final": mad(xs[-1], xs_nc[-1]),
            "max_abs_reference_row_vs_no_control_final": mad(xs[-1][0], xs_nc[-1][0]),
        })
        print(f"controlnet_pipe_{tag} case{ci} scale {scale} [{start},{end}]: pipe diff {pipe_diff:.3g} vs no "
              f"control {cases[-1]['max_abs_vs_no_control_final']:.3g} (reference row "
              f"{cases[-1]['max_abs_reference_row_vs_no_control_final']:.3g})", flush=True)
    t["latents_final_no_control"] = xs_nc[-1]
    info = {
        "kind": "controlnet_pipe", "models": dict(models, controlnet=cn_rel), "sdxl": tag == "sdxl",
        "n_images": n, "cfg_batch": 2 * n, "guidance_scale": cfg, "eta": 0.0, "steps": steps,
        "scheduler": scheduler_info(base), "init_noise_sigma": float(base.init_noise_sigma),
        "stylealigned": dict(SA_OPTIONS, **set_plan(n)), "stylealigned_levels": "all", "stylealigned_window": [0.0, 1.0],
        "control_rows": {"targets": list(range(1, n)), "reference": [0],
                         "cfg_rows_with_zero_residuals": reference_rows(2 * n)},
        "control_image_size": [hw * factor, hw * factor], "controlnet_conditioning_downsampling": factor,
        "guess_mode": False, "cases": cases, "pipeline": pipe_cls.__name__,
        **text["info"],
        "note": ("One StyleAligned set of 3 images (row 0 reference, rows 1, 2 targets) from latents_init (= noise * "
                 "init_noise_sigma), DDIM (eta 0) CFG loop, UNet batch [uncond x3 | cond x3], StyleAligned (options and "
                 "plan in `stylealigned`) on all levels at every step. The ControlNet runs on the CFG batch with "
                 "x_in = scale_model_input(cat[x, x], t), the same t and encoder_hidden_states"
                 + (" and added_cond_kwargs" if tag == "sdxl" else "")
                 + ", controlnet_cond = control image of each row (control_images[r-1] for target r, in [0,1], no "
                 "normalisation; both CFG halves get the same image), conditioning_scale = scale * keep(i), keep(i) = "
                 "1 - float(i/n < start or (i+1)/n > end) (diffusers' control_guidance_start/end); the residuals of the "
                 "reference rows (0 and 3) are ZERO (the ControlNet acts on the targets only; running it on the targets "
                 "alone gives the same target residuals). The UNet adds down residual k to skip k and the mid residual "
                 "to the mid block output. Tensors: shared as listed in text_tensors plus latents_init (3,4,h,w), "
                 "control_images (2,3,H,W), timesteps (8,) int64, timesteps_f32, alpha_prod_t, alpha_prod_t_prev, "
                 "latents_final_no_control (same loop, StyleAligned on, no ControlNet). Per case (prefix caseN.): "
                 "latents_steps (9,3,4,h,w) ([0] = init, [k+1] after step k), noise_pred_steps (8,3,4,h,w) guided eps, "
                 "latents_final, image_decoded = vae.decode(latents_final / scaling_factor) raw; case0 also "
                 "step0.down.k / step0.mid = the residuals of step 0 for the CFG batch of 6 (already times the scale, "
                 "zero rows 0 and 3). manual_vs_diffusers_pipeline_max_abs: " + pipe_cls.__name__ + ".__call__ with "
                 "the same inputs, the UNet patched and the ControlNet's reference-row residuals zeroed."),
    }
    out.tensors(f"controlnet_pipe_{tag}.safetensors", t, info)


def controlnet_pipe_sd15_golden(out: Out, c: dict, cn):
    from diffusers import StableDiffusionControlNetPipeline
    seed = SEEDS["cn_pipe_sd15"]
    ids, ehs = sd15_text(c["text_encoder"], seed, 3)
    text = {"ehs_u": ehs[:3], "ehs_c": ehs[3:], "tensors": {"input_ids": ids, "encoder_hidden_states": ehs},
            "info": {"text_tensors": "input_ids (6,16) int64 [uncond x3 | cond x3]; encoder_hidden_states (6,16,32) "
                                     "= CLIP(input_ids).last_hidden_state"}}
    kw = sd15_pipe_kwargs(c, None)
    kw.pop("scheduler")
    kw["controlnet"] = cn
    controlnet_pipe_golden(out, "sd15", c, cn, CN_SD15, text, StableDiffusionControlNetPipeline, kw,
                           {"prompt_embeds": ehs[3:], "negative_prompt_embeds": ehs[:3]}, CFG_SD15,
                           {"unet": f"{SD15}/unet", "vae": f"{SD15}/vae", "text_encoder": f"{SD15}/text_encoder"},
                           seed, "ddim")


def controlnet_pipe_sdxl_golden(out: Out, c: dict, cn):
    from diffusers import StableDiffusionXLControlNetPipeline
    seed = SEEDS["cn_pipe_sdxl"]
    n = 3
    te1, te2 = c["text_encoder"], c["text_encoder_2"]
    seq = te1.config.max_position_embeddings
    bos, eos = te1.config.bos_token_id, te1.config.eos_token_id
    ids = token_ids(seed, n, seq, bos, eos, [5, 9, 14])
    ids2 = ids.clone()
    for r in range(n):   # tokenizer_2 pads with 0 after the first EOS (as SDXL's)
        first = int((ids[r] == eos).nonzero()[0])
        ids2[r, first + 1:] = 0
    with torch.no_grad():
        o1 = te1(ids, output_hidden_states=True)
        o2 = te2(ids2, output_hidden_states=True)
    pe = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    pooled = o2.text_embeds
    neg, neg_pooled = torch.zeros_like(pe), torch.zeros_like(pooled)
    hw = c["unet"].config.sample_size
    size = hw * 2 ** (len(c["vae"].config.block_out_channels) - 1)
    tid = torch.tensor([[float(size), float(size), 0.0, 0.0, float(size), float(size)]]).repeat(n, 1)
    text = {"ehs_u": neg, "ehs_c": pe, "added_u": {"text_embeds": neg_pooled, "time_ids": tid},
            "added_c": {"text_embeds": pooled, "time_ids": tid},
            "tensors": {"input_ids": ids, "input_ids_2": ids2, "prompt_embeds": pe, "pooled_prompt_embeds": pooled,
                        "negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled, "add_time_ids": tid},
            "info": {"text_tensors": ("input_ids (3,77) (text_encoder, EOS-padded), input_ids_2 (3,77) (text_encoder_2, "
                                      "0-padded after EOS); prompt_embeds (3,77,80) = cat[te1.hidden_states[-2], "
                                      "te2.hidden_states[-2]]; pooled_prompt_embeds (3,40) = te2 text_embeds; "
                                      "negative_prompt_embeds / negative_pooled_prompt_embeds = zeros "
                                      "(force_zeros_for_empty_prompt); add_time_ids (3,6) = [H,W,0,0,H,W] per image "
                                      "(pixels); the UNet and ControlNet get encoder_hidden_states = cat[negative, "
                                      "prompt], text_embeds = cat[negative_pooled, pooled], time_ids = cat[add_time_ids, "
                                      "add_time_ids]. See README 'SDXL pipeline golden' for the text side."),
                     "original_size": [size, size], "crops_coords_top_left": [0, 0], "target_size": [size, size]}}
    kw = {"vae": c["vae"], "text_encoder": te1, "text_encoder_2": te2, "tokenizer": None, "tokenizer_2": None,
          "unet": c["unet"], "controlnet": cn, "force_zeros_for_empty_prompt": True, "add_watermarker": False}
    controlnet_pipe_golden(out, "sdxl", c, cn, CN_SDXL, text, StableDiffusionXLControlNetPipeline, kw,
                           {"prompt_embeds": pe, "negative_prompt_embeds": neg, "pooled_prompt_embeds": pooled,
                            "negative_pooled_prompt_embeds": neg_pooled}, CFG_SDXL,
                           {"pipeline_folder": SDXL_PIPE, "unet": f"{SDXL_PIPE}/unet", "vae": f"{SDXL_PIPE}/vae",
                            "text_encoder": f"{SDXL_PIPE}/text_encoder", "text_encoder_2": f"{SDXL_PIPE}/text_encoder_2"},
                           seed, "ddim")


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
PARTS = ("controlnet", "img2img", "window", "cnpipe", "sd2")


def generate(root: Path, parts: tuple) -> Out:
    out = Out(root, GENERATOR)
    sd15 = load_sd15(GOLDENS)
    sdxl = load_sdxl(GOLDENS)
    nets = None
    if "controlnet" in parts or "cnpipe" in parts:
        nets = controlnet_folders(out, sd15, sdxl)
    if "controlnet" in parts:
        controlnet_unet_golden(out, "sd15", sd15["unet"], nets["sd15"]["model"], CN_SD15, f"{SD15}/unet",
                               SEEDS["cn_unet_sd15"])
        controlnet_unet_golden(out, "sdxl", sdxl["unet"], nets["sdxl"]["model"], CN_SDXL, f"{SDXL_PIPE}/unet",
                               SEEDS["cn_unet_sdxl"])
    if "img2img" in parts:
        img2img_golden(out, sd15)
    if "window" in parts:
        style_window_golden(out, sd15)
    if "cnpipe" in parts:
        controlnet_pipe_sd15_golden(out, sd15, nets["sd15"]["model"])
        controlnet_pipe_sdxl_golden(out, sdxl, nets["sdxl"]["model"])
    if "sd2" in parts:
        unet = sd2_unet_folder(out)
        net = controlnet_folder(out, "sd2", CN_SD2, unet, CN_SD2_COND_CHANNELS, SEEDS["cn_sd2"], f"{SD2}/unet")
        controlnet_unet_golden(out, "sd2", unet, net["model"], CN_SD2, f"{SD2}/unet", SEEDS["cn_unet_sd2"])
    return out


def main():
    ap, g = arg_parser(__doc__)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list out of {PARTS} (default: all)")
    g.add_argument("--refharness", type=Path, default=None,
                   help="folder with sa_ref.py: compare this script's StyleAligned patch with it (writes nothing)")
    args = ap.parse_args()
    if args.refharness is not None:
        return crosscheck(args.refharness)
    parts = tuple(p for p in args.parts.split(",") if p)
    assert all(p in PARTS for p in parts), parts
    return check_or_write(lambda root: generate(root, parts), args.check, args.out, versions(numpy))


if __name__ == "__main__":
    sys.exit(main())
