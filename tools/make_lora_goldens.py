#!/usr/bin/env python3
"""LoRA goldens made with diffusers itself (load_lora_weights / set_adapters).

    <venv>/bin/python tools/make_lora_goldens.py            # writes the files below + manifest entries
    <venv>/bin/python tools/make_lora_goldens.py --check    # regenerates in memory, compares bitwise
    <venv>/bin/python tools/make_lora_goldens.py --out DIR  # writes the same files into DIR (no manifest)

Writes, under tests/fixtures/goldens/:
    loras/sd15_kohya.safetensors   kohya keys (lora_unet_*, lora_te_*), `alpha`, LoCon 3x3 conv layers
    loras/sd15_peft.safetensors    diffusers/PEFT keys (unet.*.lora_A/lora_B, text_encoder.*)
    loras/sdxl_kohya.safetensors   kohya SDXL keys: lora_te1_*, lora_te2_*, SGM-named UNet layers
                                   (input_blocks_*/middle_block_*/output_blocks_*), `alpha`, LoCon convs
    loras/sdxl_peft.safetensors    PEFT keys (unet.*, text_encoder.*, text_encoder_2.*)
    lora_sd15.safetensors, lora_sdxl.safetensors   kind "lora"

Both A and B are random (PEFT initialises B to zero; a trained LoRA has both non-zero), scaled so
that each LoRA changes the outputs visibly (the info records by how much). Each golden holds, per
case (an adapter list with weights; "multi" mixes two adapters, one weight negative): the text
encoder output, one UNet call on fixed inputs, and an end-to-end CFG + DDIM loop (final latents and
the decoded image), plus the same without LoRA ("base"). CPU, float32, one thread.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# goldens_common first: it sets the environment (threads, offline hub) before torch is imported
from goldens_common import GOLDENS, Out, arg_parser, check_or_write, gen, mad, versions

import peft
import torch
import torch.nn as nn
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

GENERATOR = "tools/make_lora_goldens.py"
RANK = 4
STEPS = 4
GUIDANCE = 5.0
SEEDS = dict(sd15=901, sdxl=902)


# ------------------------------------------------------------------------------------------
# random LoRAs
# ------------------------------------------------------------------------------------------
UNET_LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def unet_targets(unet, convs: bool) -> list:
    """(name, module) of the UNet layers a LoRA adapts: every attention-block linear (and 1x1 conv
    proj_in/proj_out), plus with `convs` the resnets' conv1/conv2 and time_emb_proj (LoCon)."""
    out = []
    for name, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        leaf_ok = any(name.endswith("." + s) for s in UNET_LINEAR) and "attentions" in name
        conv_ok = convs and ".resnets." in name and name.rsplit(".", 1)[1] in ("conv1", "conv2", "time_emb_proj")
        if leaf_ok or conv_ok:
            out.append((name, m))
    return out


def te_targets(te) -> list:
    """Text encoder layers under their usual LoRA names `text_model.encoder.layers.N.…` (recent
    transformers flatten CLIPTextModel's modules; LoRA files, and diffusers, keep the prefix)."""
    pre = "" if hasattr(te, "text_model") else "text_model."
    return [(pre + n, m) for n, m in te.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TE_LINEAR]


def pair(m, g: torch.Generator, gain: float):
    """Random (down, up) for module m: down (r, in[, k, k]) like the layer, up (out, r[, 1, 1])."""
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0]
        fan = m.in_channels * k * k
        down = torch.randn(RANK, m.in_channels, k, k, generator=g) / fan ** 0.5
        up = torch.randn(m.out_channels, RANK, 1, 1, generator=g) * gain / RANK ** 0.5
    else:
        down = torch.randn(RANK, m.in_features, generator=g) / m.in_features ** 0.5
        up = torch.randn(m.out_features, RANK, generator=g) * gain / RANK ** 0.5
    return down.contiguous(), up.contiguous()


def sgm_name(name: str, layers_per_block: int) -> str | None:
    """diffusers UNet module name -> its SGM/LDM name (kohya SDXL), for resnets and attentions."""
    p = name.split(".")
    per = layers_per_block + 1
    inner = {"resnets": "0", "attentions": "1"}
    resnet = {"conv1": ["in_layers", "2"], "conv2": ["out_layers", "3"], "time_emb_proj": ["emb_layers", "1"]}

    def rest(kind: str, tail: list) -> list:
        if kind == "resnets":
            return resnet[tail[0]] if tail and tail[0] in resnet else None
        return tail

    if p[0] == "down_blocks" and p[2] in inner:
        b, kind, j = int(p[1]), p[2], int(p[3])
        t = rest(kind, p[4:])
        return None if t is None else ".".join(["input_blocks", str(1 + b * per + j), inner[kind]] + t)
    if p[0] == "mid_block" and p[1] in inner:
        kind, j = p[1], int(p[2])
        idx = {"resnets": {0: 0, 1: 2}, "attentions": {0: 1}}[kind][j]
        t = rest(kind, p[3:])
        return None if t is None else ".".join(["middle_block", str(idx)] + t)
    if p[0] == "up_blocks" and p[2] in inner:
        b, kind, j = int(p[1]), p[2], int(p[3])
        t = rest(kind, p[4:])
        return None if t is None else ".".join(["output_blocks", str(b * per + j), inner[kind]] + t)
    return None


def kohya_lora(unet, encoders: list, seed: int, gain: float, sgm: bool) -> dict:
    """kohya keys: `<prefix>_<name with _>.lora_down.weight/.lora_up.weight/.alpha`; encoders are
    (kohya prefix, model). alpha varies by layer (scale alpha/rank)."""
    g = gen(seed)
    sd = {}
    others = [1.0, 4.0, 3.0]

    def alpha(name: str, k: int) -> float:
        # diffusers 0.42 maps a per-module alpha of attention projections (to_q/k/v/out,
        # q/k/v/out_proj) to a name PEFT never matches, so those layers get the most common
        # alpha: give them all that alpha (2.0, the majority); the others vary per layer. With
        # recent transformers (flattened CLIPTextModel) it ignores every per-module alpha of a
        # `text_model.`-prefixed text encoder key: the text encoders get 2.0 throughout.
        leaf = name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "to_out"
        if leaf in ("to_q", "to_k", "to_v", "to_out", "q_proj", "k_proj", "v_proj", "out_proj"):
            return 2.0
        return others[k % len(others)]

    def add(key: str, m, a: float):
        down, up = pair(m, g, gain)
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(a)

    for k, (name, m) in enumerate(unet_targets(unet, convs=True)):
        a = alpha(name, k)
        if sgm:
            s = sgm_name(name, unet.config.layers_per_block)
            assert s is not None, name
            name = s
        add("lora_unet_" + name.replace(".", "_"), m, a)
    for prefix, te in encoders:
        for k, (name, m) in enumerate(te_targets(te)):
            add(prefix + "_" + name.replace(".", "_"), m, 2.0)
    return sd


def peft_lora(unet, encoders: list, seed: int, gain: float) -> dict:
    """diffusers/PEFT keys: `<component>.<name>.lora_A.weight` / `lora_B.weight` (no alpha: scale 1)."""
    g = gen(seed)
    sd = {}
    targets = [("unet", n, m) for n, m in unet_targets(unet, convs=False)]
    # one LoCon-style 3x3 conv in PEFT form too
    targets += [("unet", n, m) for n, m in unet.named_modules() if n == "down_blocks.0.resnets.0.conv1"]
    for comp, te in encoders:
        targets += [(comp, n, m) for n, m in te_targets(te)]
    for comp, name, m in targets:
        down, up = pair(m, g, gain)
        sd[f"{comp}.{name}.lora_A.weight"] = down
        sd[f"{comp}.{name}.lora_B.weight"] = up
    return sd


# ------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------
def token_ids(seed: int, rows: int, seq: int, bos: int, eos: int) -> torch.Tensor:
    g = gen(seed)
    out = []
    for r in range(rows):
        ln = 2 + (3 * r) % (seq - 3)
        ids = [bos] + torch.randint(1, min(bos, 400), (ln,), generator=g).tolist() + [eos]
        out.append((ids + [eos] * seq)[:seq])
    return torch.tensor(out, dtype=torch.int64)


def encode(pipe, ids, ids2):
    with torch.no_grad():
        if ids2 is None:
            return pipe.text_encoder(ids).last_hidden_state, None
        o1 = pipe.text_encoder(ids, output_hidden_states=True)
        o2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
        return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1), o2.text_embeds


def run_case(pipe, x: dict, sdxl: bool) -> dict:
    ehs, pooled = encode(pipe, x["input_ids"], x.get("input_ids_2"))
    out = {"encoder_hidden_states": ehs}
    kw = {}
    if sdxl:
        out["pooled"] = pooled
        kw = {"added_cond_kwargs": {"text_embeds": x["unet_in.text_embeds"], "time_ids": x["unet_in.time_ids"]}}
    with torch.no_grad():
        out["unet_out"] = pipe.unet(x["unet_in.sample"], x["unet_in.timestep"], encoder_hidden_states=x["unet_in.encoder_hidden_states"],
                                    **kw).sample
    # end to end: CFG (uncond rows first) + DDIM over the LoRA'd text encoder and UNet
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    lat = x["latents_init"] * sched.init_noise_sigma
    n = lat.shape[0]
    for t in sched.timesteps:
        x_in = sched.scale_model_input(torch.cat([lat, lat]), t)
        kw = {}
        if sdxl:
            kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": x["time_ids"].repeat(2 * n, 1)}}
        with torch.no_grad():
            e = pipe.unet(x_in, t, encoder_hidden_states=ehs, **kw).sample
        eu, ec = e.chunk(2)
        lat = sched.step(eu + GUIDANCE * (ec - eu), t, lat).prev_sample
    out["latents_final"] = lat
    with torch.no_grad():
        out["image_decoded"] = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    return out


def make_family(fam: str, out: Out) -> dict:
    """Writes the family's two LoRA files and its golden into `out`; returns how much each LoRA changes each
    output (max abs against "base")."""
    out_dir = out.root
    seed = SEEDS[fam]
    tok = CLIPTokenizer.from_pretrained(str(GOLDENS / "tokenizer"))
    if fam == "sd15":
        d = GOLDENS / "tiny_sd15"
        unet = UNet2DConditionModel.from_pretrained(str(d / "unet")).eval()
        te = CLIPTextModel.from_pretrained(str(d / "text_encoder"), attn_implementation="eager").eval()
        vae = AutoencoderKL.from_pretrained(str(d / "vae")).eval()
        sched = DDIMScheduler.from_config(json.loads((d / "scheduler" / "scheduler_config.json").read_text()))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        kohya_enc = [("lora_te", te)]
        peft_enc = [("text_encoder", te)]
        model = "tiny_sd15"
    else:
        d = GOLDENS / "tiny_sdxl_pipe"
        unet = UNet2DConditionModel.from_pretrained(str(d / "unet")).eval()
        te = CLIPTextModel.from_pretrained(str(d / "text_encoder"), attn_implementation="eager").eval()
        te2 = CLIPTextModelWithProjection.from_pretrained(str(d / "text_encoder_2"), attn_implementation="eager").eval()
        vae = AutoencoderKL.from_pretrained(str(d / "vae")).eval()
        sched = DDIMScheduler.from_config(json.loads((d / "scheduler" / "scheduler_config.json").read_text()))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=sched)
        kohya_enc = [("lora_te1", te), ("lora_te2", te2)]
        peft_enc = [("text_encoder", te), ("text_encoder_2", te2)]
        model = "tiny_sdxl_pipe"

    files = {
        f"loras/{fam}_kohya.safetensors": kohya_lora(unet, kohya_enc, seed, 1.5, sgm=(fam == "sdxl")),
        f"loras/{fam}_peft.safetensors": peft_lora(unet, peft_enc, seed + 1, 1.0),
    }
    for rel, sd in files.items():
        p = out_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(p), metadata={"format": "pt"})
        out.plain(rel, {"kind": "lora_file", "format": "kohya" if "kohya" in rel else "peft", "family": fam})

    # inputs
    n = 2
    cfg = te.config
    seq = 16
    x = {"input_ids": token_ids(seed + 10, 2 * n, seq, cfg.bos_token_id if cfg.bos_token_id < cfg.vocab_size else cfg.vocab_size - 2,
                                cfg.eos_token_id if cfg.eos_token_id < cfg.vocab_size else cfg.vocab_size - 1)}
    if fam == "sdxl":
        c2 = te2.config
        x["input_ids_2"] = token_ids(seed + 11, 2 * n, seq, min(c2.bos_token_id, c2.vocab_size - 2), min(c2.eos_token_id, c2.vocab_size - 1))
    uc = unet.config
    s = uc.sample_size
    g = gen(seed + 20)
    x["unet_in.sample"] = torch.randn(2, uc.in_channels, s, s, generator=g)
    x["unet_in.timestep"] = torch.tensor([500.0, 120.0])
    x["unet_in.encoder_hidden_states"] = torch.randn(2, seq, uc.cross_attention_dim, generator=g)
    if fam == "sdxl":
        x["unet_in.text_embeds"] = torch.randn(2, te2.config.projection_dim, generator=g)
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        x["unet_in.time_ids"] = torch.tensor([[s * f, s * f, 0.0, 0.0, s * f, s * f]] * 2)
        x["time_ids"] = torch.tensor([[s * f, s * f, 0.0, 0.0, s * f, s * f]])
    x["latents_init"] = torch.randn(n, uc.in_channels, s, s, generator=g)

    cases = [
        {"name": "base", "adapters": []},
        {"name": "kohya", "adapters": [[f"loras/{fam}_kohya.safetensors", 1.0]]},
        {"name": "peft", "adapters": [[f"loras/{fam}_peft.safetensors", 1.0]]},
        {"name": "multi", "adapters": [[f"loras/{fam}_kohya.safetensors", 0.8], [f"loras/{fam}_peft.safetensors", -0.6]]},
    ]
    tensors = {k: v for k, v in x.items()}
    results = {}
    for case in cases:
        if case["adapters"]:
            names = []
            for k, (rel, _) in enumerate(case["adapters"]):
                name = f"a{k}"
                pipe.load_lora_weights(str(out_dir / rel), adapter_name=name)
                names.append(name)
            pipe.set_adapters(names, adapter_weights=[w for _, w in case["adapters"]])
        r = run_case(pipe, x, fam == "sdxl")
        if case["adapters"]:
            pipe.unload_lora_weights()
        results[case["name"]] = r
        for k, v in r.items():
            tensors[f"{case['name']}.{k}"] = v
    # the LoRAs must change every output visibly
    effect = {c["name"]: {k: mad(results[c["name"]][k], results["base"][k]) for k in results["base"]} for c in cases if c["adapters"]}
    for c, e in effect.items():
        for k, v in e.items():
            assert v > 1e-2, f"{fam} {c}: LoRA changes {k} by only {v}"
    info = {
        "kind": "lora", "family": fam, "model": model, "rank": RANK, "steps": STEPS, "guidance_scale": GUIDANCE,
        "scheduler": {"class": "DDIMScheduler", "config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}},
        "n_images": n, "cases": cases, "lora_effect_max_abs": effect, "versions": versions(peft),
        "note": "rows: uncond rows (input_ids[:n]) then cond rows; unet_in.* is one UNet call on fixed inputs; "
                "latents_init (x init_noise_sigma) go through a CFG + DDIM loop",
    }
    out.tensors(f"lora_{fam}.safetensors", tensors, info)
    return effect


def generate(root: Path) -> Out:
    out = Out(root, GENERATOR)
    for fam in ("sd15", "sdxl"):
        effect = make_family(fam, out)
        print(fam, "LoRA effect (max abs vs base):", json.dumps(effect))
    return out


def main() -> int:
    ap, _ = arg_parser(__doc__)
    args = ap.parse_args()
    return check_or_write(generate, args.check, args.out, versions(peft))


if __name__ == "__main__":
    sys.exit(main())
