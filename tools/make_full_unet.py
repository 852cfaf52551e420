#!/usr/bin/env python3
"""Write a full-size, randomly initialised SD1.5 or SDXL-base UNet as a diffusers folder.

The architecture is exactly that of runwayml/stable-diffusion-v1-5 (``--family sd15``) or
stabilityai/stable-diffusion-xl-base-1.0 (``--family sdxl``); the weights are PyTorch's default
initialisation under a fixed seed (no real checkpoint is needed or fetched). Output:

    OUT/unet/config.json
    OUT/unet/diffusion_pytorch_model.safetensors        (float32, default)
    OUT/unet/diffusion_pytorch_model.fp16.safetensors   (--fp16: float16, diffusers variant "fp16")

With --fp16 the model is built directly in float16 (torch default dtype), so SDXL (2.57e9 params)
never needs its 10.3 GB float32 copy in memory.

Example:
    .venv/bin/python tools/make_full_unet.py --family sd15 --out models/sd15
    .venv/bin/python tools/make_full_unet.py --family sdxl --out models/sdxl --fp16
"""
import argparse
import json
import os
import sys
import time

# Every UNet2DConditionModel field, spelled out (diffusers 0.42.1 names). Values are those of the
# public hub configs; fields absent there hold diffusers' defaults, which is what from_pretrained
# would use for them anyway.
SD15_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 768,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,  # historical name: this is the number of heads (8 heads everywhere)
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

SDXL_CONFIG = {
    **SD15_CONFIG,
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],  # mid block uses the last entry (10)
    "attention_head_dim": [5, 10, 20],  # heads per level; head dim is 64 everywhere
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text embeds + 6 * 256 time ids
    "upcast_attention": None,  # as in the hub config (treated as False)
}

CONFIGS = {"sd15": SD15_CONFIG, "sdxl": SDXL_CONFIG}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(CONFIGS), required=True, help="architecture to build")
    ap.add_argument("--out", required=True, help="output folder; the UNet goes to OUT/unet/")
    ap.add_argument("--fp16", action="store_true", help="build and save in float16 (variant 'fp16')")
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the initialisation (default 0)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.fp16 else torch.float32
    config = CONFIGS[args.family]

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_default_dtype(dtype)
    try:
        unet = UNet2DConditionModel.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    unet.eval()
    n_params = sum(p.numel() for p in unet.parameters())
    dtypes = sorted({str(p.dtype) for p in unet.parameters()})
    t_build = time.perf_counter() - t0

    out_dir = os.path.join(args.out, "unet")
    t1 = time.perf_counter()
    unet.save_pretrained(out_dir, safe_serialization=True, variant="fp16" if args.fp16 else None)
    t_save = time.perf_counter() - t1

    files = {f: os.path.getsize(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir))}
    print(json.dumps({
        "family": args.family, "out": out_dir, "dtype": dtypes, "params": n_params,
        "seed": args.seed, "build_s": round(t_build, 1), "save_s": round(t_save, 1), "files": files,
    }))


if __name__ == "__main__":
    sys.exit(main())
