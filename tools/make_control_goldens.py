"""Goldens for ControlNet, img2img targets and StyleAligned per level / per step window.

Usage (from the repository root):

    <venv>/bin/python tools/make_control_goldens.py            # writes into tests/fixtures/goldens/
    <venv>/bin/python tools/make_control_goldens.py --check    # regenerates in memory, compares bitwise
    <venv>/bin/python tools/make_control_goldens.py --out DIR  # writes the same files into DIR (no manifest)
    [--refharness DIR]   optional: the folder that holds sa_ref.py; the StyleAligned patch used here is
                         then also compared with sa_ref.apply_comfy (recorded in info, not needed)

Inputs (already committed): tests/fixtures/goldens/tiny_sd15/{unet,vae,text_encoder,scheduler} and
tests/fixtures/goldens/tiny_sdxl_pipe/. Outputs (see tools/README.md for what each file holds):

    tiny_controlnet_sd15/, tiny_controlnet_sdxl/      diffusers ControlNetModel folders (random weights)
    tiny_controlnet_single/control_tiny_sd15.safetensors (+ .json), control_tiny_sdxl.safetensors (+ .json)
                                                       the same weights in the original ControlNet layout
    controlnet_sd15.safetensors, controlnet_sdxl.safetensors        kind "controlnet_unet"
    controlnet_pipe_sd15.safetensors, controlnet_pipe_sdxl.safetensors  kind "controlnet_pipe"
    img2img_sd15.safetensors                                           kind "img2img_pipe"
    style_window_sd15.safetensors                                      kind "style_window_pipe"

CPU, float32, one thread. Every golden's `info` metadata (JSON) describes its cases completely, and
records how far the manual loop is from diffusers' own pipeline run with the same inputs.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

torch.set_num_threads(1)

import diffusers  # noqa: E402
import numpy  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, EulerDiscreteScheduler,  # noqa: E402
                       UNet2DConditionModel)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402
import diffusers.utils.logging as _dlog  # noqa: E402
import transformers.utils.logging as _tlog  # noqa: E402

_dlog.disable_progress_bar()
_tlog.disable_progress_bar()

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "fixtures" / "goldens"
GENERATOR = "tools/make_control_goldens.py"

CN_SD15 = "tiny_controlnet_sd15"
CN_SDXL = "tiny_controlnet_sdxl"
CN_SINGLE = "tiny_controlnet_single"
SD15 = "tiny_sd15"
SDXL_PIPE = "tiny_sdxl_pipe"

# conditioning embedding widths: the number of stride-2 convs (len - 1) matches each VAE's factor
CN_SD15_COND_CHANNELS = (8, 16)            # x2: image 32x32 -> latent 16x16 (tiny_sd15/vae)
CN_SDXL_COND_CHANNELS = (4, 8, 8, 16)      # x8: image 64x64 -> latent 8x8 (tiny_sdxl_pipe/vae)
SEEDS = dict(cn_sd15=701, cn_sdxl=702, cn_unet_sd15=710, cn_unet_sdxl=720, cn_pipe_sd15=730,
             cn_pipe_sdxl=740, img2img=750, window=760)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float32)


def rand(seed: int, *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=gen(seed), dtype=torch.float32)


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def versions() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "numpy": numpy.__version__}


def write_json(path: Path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(path, 0o644)


class Out:
    """Collects the files of one run (into `root`) and their manifest entries."""

    def __init__(self, root: Path):
        self.root = root
        self.entries: dict = {}
        self.files: list[str] = []

    def tensors(self, rel: str, tensors: dict, info: dict):
        tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
        for k, v in tensors.items():
            assert v.dtype in (torch.float32, torch.int64), (rel, k, v.dtype)
            assert torch.isfinite(v.double()).all(), (rel, k)
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        info = dict(info, generator=GENERATOR)
        save_file(tensors, str(path), metadata={"info": json.dumps(info, sort_keys=True, allow_nan=False)})
        os.chmod(path, 0o644)
        size = path.stat().st_size
        assert size < 2_000_000, f"{rel}: {size} bytes (limit 2 MB)"
        entry = dict(info)
        entry["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                            for k, v in tensors.items()}
        entry["size_bytes"] = size
        self.entries[rel] = entry
        self.files.append(rel)

    def folder(self, rel: str, entry: dict):
        d = self.root / rel
        files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        for f in files:
            os.chmod(d / f, 0o644)
            assert (d / f).stat().st_size < 2_000_000, f"{rel}/{f} over 2 MB"
        self.entries[rel + "/"] = dict(entry, files=files, generator=GENERATOR,
                                       size_bytes=sum((d / f).stat().st_size for f in files))
        self.files += [f"{rel}/{f}" for f in files]


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
def randomize_norm_affine(model: nn.Module, seed: int):
    """Norm layers start as weight=1 / bias=0; make them random (as the refharness tiny models)."""
    g = gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


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
            new = f"input_hint_block.{2 * (n_hint_blocks + 1)}." + p[-1]
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

    Two places where that converter cannot read a tiny file are bridged explicitly and recorded:
    * it takes the conditioning embedding's conv_out from `input_hint_block.14` (the index in real
      ControlNets: 3 stride-2 convs, 8x); in a tiny file with fewer hint convs conv_out is the LAST
      index (the layout nn.Sequential gives), which the converter files as one more `blocks.N`;
    * it never maps `label_emb` (SDXL's add_embedding), although diffusers' own table
      DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"] lists it: that table is applied.
    The full from_single_file call is tried too and its outcome recorded."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
    ckpt = load_file(str(single))
    cfg = json.loads((folder / "config.json").read_text())
    conv = convert_controlnet_checkpoint(dict(ckpt), cfg)
    fixups = []
    nb = 2 * (len(cfg["conditioning_embedding_out_channels"]) - 1)
    if "controlnet_cond_embedding.conv_out.weight" not in conv or conv["controlnet_cond_embedding.conv_out.weight"] is None:
        for suffix in ("weight", "bias"):
            conv[f"controlnet_cond_embedding.conv_out.{suffix}"] = conv.pop(f"controlnet_cond_embedding.blocks.{nb}.{suffix}")
        fixups.append(f"controlnet_cond_embedding.conv_out <- input_hint_block.{2 * (nb + 1)} (converter expects 14)")
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
        res["from_single_file"] = "loads, identical" if all(torch.equal(a[k], la[k]) for k in a) else "loads, differs"
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
        res["from_single_file"] = f"fails ({type(e).__name__}), because of the fixups above"
    return res


def controlnet_folders(out: Out, sd15: dict, sdxl: dict) -> dict:
    """Write both ControlNet folders and the single files; return the built models."""
    nets = {}
    for tag, rel, comps, ch, seed, unet_rel in (
            ("sd15", CN_SD15, sd15, CN_SD15_COND_CHANNELS, SEEDS["cn_sd15"], f"{SD15}/unet"),
            ("sdxl", CN_SDXL, sdxl, CN_SDXL_COND_CHANNELS, SEEDS["cn_sdxl"], f"{SDXL_PIPE}/unet")):
        cn = build_controlnet(comps["unet"], ch, seed)
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
        nets[tag] = {"model": back, "rel": rel, "single_file_check": chk}
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
                       "input_hint_block.2(j+1) (controlnet_cond_embedding.blocks.j), input_hint_block.<last, "
                       "= 2(nblocks+1)> (controlnet_cond_embedding.conv_out; 14 in real SD ControlNets, "
                       f"{2 * (2 * (len(cn.config.conditioning_embedding_out_channels) - 1) + 1)} here)."),
            "verification": chk,
        }
    return nets


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
# driver
# ------------------------------------------------------------------------------------------
PARTS = ("controlnet", "img2img", "window", "cnpipe")


def generate(root: Path, parts: tuple, refharness: Path | None) -> Out:
    out = Out(root)
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
    sa_ref = None
    if refharness is not None:
        sys.path.insert(0, str(refharness))
        import sa_ref  # noqa: F811  (our team's reference StyleAligned; optional cross-check)
    if "img2img" in parts:
        img2img_golden(out, sd15, sa_ref)
    if "window" in parts:
        style_window_golden(out, sd15, sa_ref)
    if "cnpipe" in parts:
        controlnet_pipe_sd15_golden(out, sd15, nets["sd15"]["model"], sa_ref)
        controlnet_pipe_sdxl_golden(out, sdxl, nets["sdxl"]["model"], sa_ref)
    return out


def compare(new: Out, old_root: Path) -> list[str]:
    fails = []
    for rel in new.files:
        a, b = new.root / rel, old_root / rel
        if not b.exists():
            fails.append(f"{rel}: missing")
            continue
        if a.read_bytes() == b.read_bytes():
            continue
        if rel.endswith(".safetensors"):
            ta, tb = load_file(str(a)), load_file(str(b))
            for k in sorted(set(ta) | set(tb)):
                if k not in ta or k not in tb:
                    fails.append(f"{rel}:{k} only in one file")
                elif ta[k].shape != tb[k].shape or ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]):
                    d = mad(ta[k], tb[k]) if ta[k].shape == tb[k].shape else float("nan")
                    fails.append(f"{rel}:{k} differs (max abs {d:.3g})")
            with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
                if fa.metadata() != fb.metadata():
                    fails.append(f"{rel}: metadata differs")
        fails.append(f"{rel}: bytes differ")
    stored = json.loads((old_root / "manifest.json").read_text()).get("files", {})
    for rel, entry in new.entries.items():
        if stored.get(rel) != json.loads(json.dumps(entry, allow_nan=False)):
            fails.append(f"manifest.json entry {rel} differs or is missing")
    return fails


def merge_manifest(path: Path, entries: dict):
    """Read-modify-write: only this script's entries are replaced, everything else is kept."""
    m = json.loads(path.read_text())
    m.setdefault("files", {}).update(entries)
    m.setdefault("generator_versions", {})[GENERATOR] = versions()
    tmp = path.with_name(path.name + ".tmp-control")
    with open(tmp, "w") as f:
        f.write(json.dumps(m, indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare")
    g.add_argument("--out", type=Path, help="write into this folder instead (no manifest update)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list out of {PARTS} (default: all)")
    ap.add_argument("--refharness", type=Path, default=None,
                    help="folder with sa_ref.py: also compare this script's StyleAligned patch with it")
    args = ap.parse_args()
    parts = tuple(p for p in args.parts.split(",") if p)
    assert all(p in PARTS for p in parts), parts
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            out = generate(Path(tmp), parts, args.refharness)
            fails = compare(out, GOLDENS)
        if fails:
            print("\n".join(fails))
            print(f"CHECK FAILED: {len(fails)} differences")
            return 1
        print(f"CHECK OK: {len(out.files)} regenerated files bitwise identical, manifest entries equal")
        return 0
    root = args.out if args.out else GOLDENS
    root.mkdir(parents=True, exist_ok=True)
    out = generate(root, parts, args.refharness)
    if args.out is None:
        merge_manifest(GOLDENS / "manifest.json", out.entries)
    print(f"wrote {len(out.files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
