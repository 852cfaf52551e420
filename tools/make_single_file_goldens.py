"""Goldens for single-file Stable Diffusion checkpoints (the original LDM / SGM layout).

Usage (from the repository root):

    <venv>/bin/python tools/make_single_file_goldens.py            # writes into tests/fixtures/goldens/
    <venv>/bin/python tools/make_single_file_goldens.py --check    # regenerates in memory, compares bitwise
    <venv>/bin/python tools/make_single_file_goldens.py --out DIR  # writes the same files into DIR (no manifest)

Inputs (already committed): tests/fixtures/goldens/tiny_sd15/, tiny_sd2/unet/, tiny_sdxl_pipe/.
Outputs:

    tiny_single/sd15.safetensors (+ sd15.json)   tiny_sd15 as one original-layout float16 file: UNet under
                                                 model.diffusion_model., VAE under first_stage_model.,
                                                 CLIP under cond_stage_model.transformer.
    tiny_single/sd2.safetensors (+ sd2.json)     an SD2-like pipeline (tiny_sd2's UNet, tiny_sd15's VAE, a
                                                 random OpenCLIP-style text encoder stored with fused
                                                 in_proj weights under cond_stage_model.model.,
                                                 v-prediction)
    tiny_single/sdxl.safetensors (+ sdxl.json)   tiny_sdxl_pipe with its text encoders under
                                                 conditioner.embedders.0.transformer. / .1.model.
    single_file_sd15.safetensors, single_file_sd2.safetensors, single_file_sdxl.safetensors
                                                 kind "single_file"

Each `<name>.json` is the sidecar config the server reads beside a single file: the folder's
unet / vae / text_encoder(_2) / scheduler configs.

How the mapping is checked against diffusers: the script writes the original-layout file, diffusers'
own `from_single_file` (with the folder as `config=`) reads it back, and the script asserts that every
weight diffusers loaded equals the folder's bitwise. The goldens are then computed with that
single-file-loaded diffusers pipeline: text encoders, one UNet call, VAE encode and decode, and a full
pipeline call (CFG, a few steps) from given noise.

CPU, float32, one thread.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

# goldens_common first: it sets the environment (threads, offline hub) before torch is imported
from goldens_common import GOLDENS, Out, arg_parser, check_or_write, gen, randomize_norm_affine, versions, write_json

import numpy
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

GENERATOR = "tools/make_single_file_goldens.py"
SINGLE = "tiny_single"
SEEDS = dict(sd2_text=801, sd15=810, sd2=820, sdxl=830)
STEPS = 3
GUIDANCE = 5.0


# ------------------------------------------------------------------------------------------
# diffusers names -> original names
# ------------------------------------------------------------------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    name, tail = rest.split(".", 1)
    return _RESNET[name] + "." + tail


def unet_to_ldm(sd: dict, cfg) -> dict:
    """diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*` (LDM openaimodel names)."""
    n = len(cfg.block_out_channels)
    layers = cfg.layers_per_block if isinstance(cfg.layers_per_block, (list, tuple)) else [cfg.layers_per_block] * n
    down_first = [1 + sum(l + 1 for l in layers[:i]) for i in range(n)]
    up_layers = [layers[n - 1 - i] + 1 for i in range(n)]
    up_first = [sum(up_layers[:i]) for i in range(n)]
    out = {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in sd.items():
        p = k.split(".")
        head = ".".join(p[:-1])
        if head in fixed:
            new = fixed[head] + "." + p[-1]
        elif p[0] == "down_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "resnets":
                new = f"input_blocks.{down_first[i] + int(p[3])}.0." + _resnet(".".join(p[4:]))
            elif kind == "attentions":
                new = f"input_blocks.{down_first[i] + int(p[3])}.1." + ".".join(p[4:])
            elif kind == "downsamplers":
                new = f"input_blocks.{down_first[i] + layers[i]}.0.op." + p[-1]
            else:
                raise KeyError(k)
        elif p[0] == "mid_block":
            j = int(p[2])
            if p[1] == "resnets":
                new = f"middle_block.{2 * j}." + _resnet(".".join(p[3:]))
            else:
                new = f"middle_block.{2 * j + 1}." + ".".join(p[3:])
        elif p[0] == "up_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "resnets":
                new = f"output_blocks.{up_first[i] + int(p[3])}.0." + _resnet(".".join(p[4:]))
            elif kind == "attentions":
                new = f"output_blocks.{up_first[i] + int(p[3])}.1." + ".".join(p[4:])
            elif kind == "upsamplers":
                slot = 2 if "CrossAttn" in cfg.up_block_types[i] else 1
                new = f"output_blocks.{up_first[i] + up_layers[i] - 1}.{slot}.conv." + p[-1]
            else:
                raise KeyError(k)
        else:
            raise KeyError(k)
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(sd: dict, cfg) -> dict:
    """diffusers AutoencoderKL state dict -> `first_stage_model.*` (LDM names; mid attention as 1x1 convs)."""
    n = len(cfg.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        side = p[0]
        if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
            new = k
        elif p[1] == "conv_norm_out":
            new = f"{side}.norm_out.{p[-1]}"
        elif p[1] == "down_blocks":
            i = int(p[2])
            if p[3] == "resnets":
                new = f"encoder.down.{i}.block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
            else:
                new = f"encoder.down.{i}.downsample.conv.{p[-1]}"
        elif p[1] == "up_blocks":
            i = n - 1 - int(p[2])
            if p[3] == "resnets":
                new = f"decoder.up.{i}.block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
            else:
                new = f"decoder.up.{i}.upsample.conv.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{side}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:])
        elif p[1] == "mid_block" and p[2] == "attentions":
            layer = ".".join(p[4:-1])
            new = f"{side}.mid.attn_1.{attn[layer]}.{p[-1]}"
            if p[-1] == "weight" and layer != "group_norm":
                v = v[:, :, None, None]
        else:
            raise KeyError(k)
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModel -> `prefix` + its own names (SD1's cond_stage_model.transformer.)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        k = k if k.startswith("text_model.") else "text_model." + k
        out[prefix + k] = v
    return out


def open_clip_to_ldm(sd: dict, prefix: str) -> dict:
    """transformers CLIP text model -> OpenCLIP names under `prefix`: resblocks with fused in_proj q/k/v,
    ln_1/ln_2, mlp.c_fc/c_proj, token_embedding, positional_embedding, ln_final, text_projection ([in, out])."""
    out = {}
    sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src = f"text_model.encoder.layers.{i}."
        dst = f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat([sd[src + f"self_attn.{q}_proj.{leaf}"] for q in "qkv"], 0)
            out[dst + f"attn.out_proj.{leaf}"] = sd[src + f"self_attn.out_proj.{leaf}"]
            out[dst + f"ln_1.{leaf}"] = sd[src + f"layer_norm1.{leaf}"]
            out[dst + f"ln_2.{leaf}"] = sd[src + f"layer_norm2.{leaf}"]
            out[dst + f"mlp.c_fc.{leaf}"] = sd[src + f"mlp.fc1.{leaf}"]
            out[dst + f"mlp.c_proj.{leaf}"] = sd[src + f"mlp.fc2.{leaf}"]
    out[prefix + "token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    used = {k for k in sd if not k.endswith("position_ids")}
    assert sum(v.numel() for k, v in sd.items() if k in used) == sum(v.numel() for v in out.values()), "unmapped tensors"
    return out


# ------------------------------------------------------------------------------------------
# the three tiny pipelines
# ------------------------------------------------------------------------------------------
def sd2_text_encoder(width: int) -> CLIPTextModel:
    """A random OpenCLIP-like text encoder for the SD2-like pipeline (gelu, `width` = the UNet's
    cross-attention width)."""
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu", layer_norm_eps=1e-5,
                         bos_token_id=998, eos_token_id=999, pad_token_id=0, projection_dim=width)
    torch.manual_seed(SEEDS["sd2_text"])
    te = CLIPTextModel(cfg)
    randomize_norm_affine(te, SEEDS["sd2_text"] + 1)
    return te.eval()


def folder_pipeline(tag: str, tmp: Path):
    """The diffusers pipeline of `tag` saved as a complete folder under tmp (model_index.json included)."""
    if tag == "sd15":
        d = GOLDENS / "tiny_sd15"
        comps = dict(unet=UNet2DConditionModel.from_pretrained(str(d / "unet")),
                     vae=AutoencoderKL.from_pretrained(str(d / "vae")),
                     text_encoder=CLIPTextModel.from_pretrained(str(d / "text_encoder"), attn_implementation="eager"),
                     scheduler=DDIMScheduler.from_pretrained(str(d / "scheduler")))
        pipe = StableDiffusionPipeline(**comps, tokenizer=None, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif tag == "sd2":
        unet = UNet2DConditionModel.from_pretrained(str(GOLDENS / "tiny_sd2" / "unet"))
        sched_cfg = json.loads((GOLDENS / "tiny_sd15" / "scheduler" / "scheduler_config.json").read_text())
        sched_cfg["prediction_type"] = "v_prediction"
        comps = dict(unet=unet, vae=AutoencoderKL.from_pretrained(str(GOLDENS / "tiny_sd15" / "vae")),
                     text_encoder=sd2_text_encoder(unet.config.cross_attention_dim),
                     scheduler=DDIMScheduler.from_config(sched_cfg))
        pipe = StableDiffusionPipeline(**comps, tokenizer=None, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        d = GOLDENS / "tiny_sdxl_pipe"
        comps = dict(unet=UNet2DConditionModel.from_pretrained(str(d / "unet")),
                     vae=AutoencoderKL.from_pretrained(str(d / "vae")),
                     text_encoder=CLIPTextModel.from_pretrained(str(d / "text_encoder"), attn_implementation="eager"),
                     text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(d / "text_encoder_2"),
                                                                                attn_implementation="eager"),
                     scheduler=EulerDiscreteScheduler.from_pretrained(str(d / "scheduler")))
        pipe = StableDiffusionXLPipeline(**comps, tokenizer=None, tokenizer_2=None, force_zeros_for_empty_prompt=True)
    folder = tmp / f"folder_{tag}"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe, folder


def to_single_file(tag: str, pipe) -> dict:
    sd = {}
    sd.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if tag == "sd15":
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    elif tag == "sd2":
        sd.update(open_clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
    else:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    # Stored as float16, as most published checkpoints are (and to keep the fixtures small).
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


def sidecar(folder: Path, tag: str) -> dict:
    comps = ["unet", "vae", "text_encoder", "scheduler"] + (["text_encoder_2"] if tag == "sdxl" else [])
    out = {}
    for c in comps:
        f = folder / c / ("scheduler_config.json" if c == "scheduler" else "config.json")
        cfg = json.loads(f.read_text())
        out[c] = {k: v for k, v in cfg.items() if k not in ("_diffusers_version", "transformers_version", "_name_or_path")}
    if tag == "sdxl":
        out["force_zeros_for_empty_prompt"] = True
    return out


def compare_weights(a_pipe, b_pipe, comps) -> dict:
    res = {}
    for c in comps:
        a, b = getattr(a_pipe, c).state_dict(), getattr(b_pipe, c).state_dict()
        keys = sorted(k for k in a if not k.endswith("position_ids"))
        missing = sorted(k for k in keys if k not in b)
        # The file holds float16: diffusers must load exactly the folder's weights rounded to float16.
        differing = sorted(k for k in keys if k in b and not torch.equal(a[k].half().float(), b[k]))
        assert not missing and not differing, (c, missing[:5], differing[:5])
        res[c] = len(keys)
    return res


def token_ids(seed: int, rows: int, seq: int, bos: int, eos: int, pad: int) -> torch.Tensor:
    """Row 0: the empty prompt (BOS, EOS, padding); other rows: random prompts of random length."""
    g = gen(seed)
    ids = torch.full((rows, seq), pad, dtype=torch.int64)
    for r in range(rows):
        n = 0 if r == 0 else int(torch.randint(1, seq - 2, (1,), generator=g))
        ids[r, 0] = bos
        ids[r, 1:1 + n] = torch.randint(1, 990, (n,), generator=g)
        ids[r, 1 + n] = eos
    return ids


@torch.no_grad()
def golden(out: Out, tag: str, tmp: Path):
    pipe, folder = folder_pipeline(tag, tmp)
    single_rel = f"{SINGLE}/{tag}.safetensors"
    single = out.root / single_rel
    single.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_single_file(tag, pipe), str(single))
    write_json(single.with_suffix(".json"), sidecar(folder, tag))
    xl = tag == "sdxl"
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = dict(tokenizer=None, tokenizer_2=None) if xl else dict(tokenizer=None, safety_checker=None,
                                                                     feature_extractor=None)
    loaded = cls.from_single_file(str(single), config=str(folder), local_files_only=True, torch_dtype=torch.float32,
                                  **extra)
    loaded.set_progress_bar_config(disable=True)
    comps = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if xl else [])
    checked = compare_weights(pipe, loaded, comps)
    out.plain(single_rel, {"kind": "single_file_checkpoint", "family": tag, "dtype": "float16",
                           "diffusers_from_single_file": "loads, every weight bitwise equal to the folder's rounded to "
                                                         "float16",
                           "tensors_checked": checked})
    out.plain(f"{SINGLE}/{tag}.json", {"kind": "single_file_sidecar", "family": tag})

    seed = SEEDS[tag]
    te = loaded.text_encoder
    tcfg = te.config
    seq = tcfg.max_position_embeddings
    ids = token_ids(seed, 2, seq, tcfg.bos_token_id, tcfg.eos_token_id, tcfg.pad_token_id)
    t = {"input_ids": ids}
    if xl:
        te2 = loaded.text_encoder_2
        ids2 = token_ids(seed + 1, 2, te2.config.max_position_embeddings, te2.config.bos_token_id,
                         te2.config.eos_token_id, 0)
        t["input_ids_2"] = ids2
        o1 = te(ids, output_hidden_states=True)
        o2 = te2(ids2, output_hidden_states=True)
        hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1)
        pooled = o2.text_embeds
        t["prompt_embeds"], t["pooled_prompt_embeds"] = hidden, pooled
        uncond, uncond_pooled = torch.zeros_like(hidden[1:]), torch.zeros_like(pooled[1:])
    else:
        hidden = te(ids).last_hidden_state
        t["prompt_embeds"] = hidden
        uncond = hidden[:1]
    cond = hidden[1:]

    unet, vae = loaded.unet, loaded.vae
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    lat = unet.config.sample_size
    g = gen(seed + 2)
    sample = torch.randn(2, unet.config.in_channels, lat, lat, generator=g)
    timestep = torch.tensor(617.0)
    kw = {}
    if xl:
        time_ids = torch.tensor([[lat * f, lat * f, 0, 0, lat * f, lat * f]] * 2, dtype=torch.float32)
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        t["unet.time_ids"] = time_ids
    t["unet.sample"], t["unet.timestep"] = sample, timestep.reshape(1)
    t["unet.out"] = unet(sample, timestep, encoder_hidden_states=hidden, **kw).sample

    image = torch.rand(1, 3, lat * f, lat * f, generator=g) * 2 - 1
    t["vae.image"] = image
    t["vae.latent_mean"] = vae.encode(image).latent_dist.mean
    latents = torch.randn(1, vae.config.latent_channels, lat, lat, generator=g)
    t["vae.latents"] = latents
    t["vae.decoded"] = vae.decode(latents).sample

    noise = torch.randn(1, unet.config.in_channels, lat, lat, generator=g)
    t["noise"] = noise
    call = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise.clone(), num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, output_type="latent", height=lat * f, width=lat * f)
    if xl:
        call.update(pooled_prompt_embeds=pooled[1:], negative_pooled_prompt_embeds=uncond_pooled)
    final = loaded(**call).images
    t["latents_final"] = final
    t["image_decoded"] = vae.decode(final / vae.config.scaling_factor).sample
    info = {"kind": "single_file", "family": tag, "model_file": single_rel, "steps": STEPS, "guidance_scale": GUIDANCE,
            "width": lat * f, "height": lat * f, "scheduler_class": type(loaded.scheduler).__name__,
            "prediction_type": loaded.scheduler.config.prediction_type,
            "uncond": "zeros (force_zeros_for_empty_prompt)" if xl else "row 0 of prompt_embeds (the empty prompt)",
            "note": "diffusers pipeline loaded with from_single_file(model_file, config=<the folder>); prompt_embeds "
                    "row 1 is the prompt of the end-to-end run; latents_final = pipeline(output_type='latent'), "
                    "image_decoded = vae.decode(latents_final / scaling_factor)"}
    out.tensors(f"single_file_{tag}.safetensors", t, info)


def generate(root: Path) -> Out:
    out = Out(root, GENERATOR)
    with tempfile.TemporaryDirectory() as tmp:
        for tag in ("sd15", "sd2", "sdxl"):
            golden(out, tag, Path(tmp))
    return out


def main():
    ap, g = arg_parser(__doc__)
    args = ap.parse_args()
    return check_or_write(generate, args.check, args.out, versions(numpy))


if __name__ == "__main__":
    sys.exit(main())
