#!/usr/bin/env python3
"""Time diffusers' UNet2DConditionModel forward on CPU (float32), as a reference for the Rust UNet.

Loads MODEL/unet (diffusers folder; plain or "fp16" variant weights, always computed in float32),
builds deterministic inputs and times --iters calls after --steps-warmup calls under
torch.inference_mode():

    sample                 (B, in_channels, H/8, W/8)    randn, seed 0
    timestep               (1,) = 421.0, broadcast to the batch
    encoder_hidden_states  (B, SEQ, cross_attention_dim) randn, SEQ = --seq (default 77)
    SDXL-style configs (addition_embed_type "text_time") also get added_cond_kwargs:
    text_embeds            (B, projection_class_embeddings_input_dim - 6*addition_time_embed_dim)
    time_ids               (B, 6) = [H, W, 0, 0, H, W]

H and W are pixels (latent = H/8 x W/8); e.g. the tiny goldens use --height 128 --width 128.
With --json, stdout carries exactly one JSON line:
    {"impl":"torch","model":DIR,"batch":B,"hw":[H,W],"ms_per_call":MEAN,"threads":T, ...}
(extra keys: latent_hw, seq, iters, warmup, min_ms, median_ms, max_ms, load_s, params,
weights_dtype, torch). Log lines and library warnings go to stderr.

Example:
    .venv/bin/python tools/bench_torch_unet.py --model tests/fixtures/goldens/tiny_sd15 \\
        --batch 2 --height 128 --width 128 --iters 20 --threads 2 --json
"""
import argparse
import json
import os
import statistics
import sys
import time


def unet_dir(model):
    """Accept either the pipeline folder (with unet/) or the unet folder itself."""
    sub = os.path.join(model, "unet")
    return sub if os.path.isfile(os.path.join(sub, "config.json")) else model


def weights_variant(path):
    """None for diffusion_pytorch_model.safetensors, "fp16" when only the fp16 variant exists."""
    if os.path.isfile(os.path.join(path, "diffusion_pytorch_model.safetensors")):
        return None
    if os.path.isfile(os.path.join(path, "diffusion_pytorch_model.fp16.safetensors")):
        return "fp16"
    sys.exit(f"no diffusion_pytorch_model[.fp16].safetensors in {path}")


def make_inputs(cfg, batch, height, width, seq, torch):
    if height % 8 or width % 8:
        sys.exit("--height and --width must be multiples of 8 (pixels; latent = /8)")
    g = torch.Generator().manual_seed(0)
    lh, lw = height // 8, width // 8
    kwargs = {
        "sample": torch.randn(batch, cfg["in_channels"], lh, lw, generator=g),
        "timestep": torch.tensor([421.0]),
        "encoder_hidden_states": torch.randn(batch, seq, cfg["cross_attention_dim"], generator=g),
    }
    if cfg.get("addition_embed_type") == "text_time":
        text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g),
            "time_ids": time_ids.repeat(batch, 1),
        }
    elif cfg.get("addition_embed_type") is not None:
        sys.exit(f"addition_embed_type {cfg['addition_embed_type']!r} not supported")
    return kwargs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="diffusers folder holding unet/ (or the unet folder)")
    ap.add_argument("--batch", type=int, default=2, help="batch size B (default 2)")
    ap.add_argument("--height", type=int, default=512, help="image height in pixels (latent = /8; default 512)")
    ap.add_argument("--width", type=int, default=512, help="image width in pixels (latent = /8; default 512)")
    ap.add_argument("--seq", type=int, default=77, help="text sequence length (default 77)")
    ap.add_argument("--steps-warmup", type=int, default=1, help="untimed calls first (default 1)")
    ap.add_argument("--iters", type=int, default=5, help="timed calls (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--load-only", action="store_true", help="load the model, read every weight once and exit (for peak-RSS checks)")
    ap.add_argument("--json", action="store_true", help="print only one JSON line on stdout")
    args = ap.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    path = unet_dir(args.model)
    variant = weights_variant(path)

    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(path, variant=variant, torch_dtype=torch.float32)
    unet.eval()
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters())
    print(f"loaded {path} ({variant or 'float32'} weights, {params} params) in {load_s:.1f} s", file=sys.stderr)
    if args.load_only:
        # Touch every weight so that lazily mapped (mmap) safetensors pages count in the RSS.
        with torch.inference_mode():
            total = sum(p.double().abs().sum().item() for p in unet.parameters())
        print(f"sum |w| = {total:.6e} ({time.perf_counter() - t0:.1f} s since load start)", file=sys.stderr)
        return

    inputs = make_inputs(unet.config, args.batch, args.height, args.width, args.seq, torch)
    times = []
    with torch.inference_mode():
        for i in range(args.steps_warmup + args.iters):
            t = time.perf_counter()
            out = unet(**inputs, return_dict=False)[0]
            dt = (time.perf_counter() - t) * 1e3
            if i >= args.steps_warmup:
                times.append(dt)
            print(f"call {i}{' (warm-up)' if i < args.steps_warmup else ''}: {dt:.1f} ms", file=sys.stderr)
    if not torch.isfinite(out).all():
        print("warning: non-finite values in the UNet output", file=sys.stderr)

    result = {
        "impl": "torch", "model": args.model, "batch": args.batch, "hw": [args.height, args.width],
        "ms_per_call": round(statistics.fmean(times), 3), "threads": args.threads,
        "latent_hw": [args.height // 8, args.width // 8], "seq": args.seq,
        "iters": args.iters, "warmup": args.steps_warmup,
        "min_ms": round(min(times), 3), "median_ms": round(statistics.median(times), 3),
        "max_ms": round(max(times), 3), "load_s": round(load_s, 2), "params": params,
        "weights_dtype": variant or "float32", "torch": torch.__version__,
        "out_abs_mean": round(out.abs().mean().item(), 6),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"torch UNet {args.model}: batch {args.batch}, {args.height}x{args.width} px, "
              f"{args.threads} threads: {result['ms_per_call']:.1f} ms/call "
              f"(min {result['min_ms']:.1f}, median {result['median_ms']:.1f}, {args.iters} iters)")


if __name__ == "__main__":
    sys.exit(main())
