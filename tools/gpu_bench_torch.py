#!/usr/bin/env python3
"""The PyTorch side of tools/gpu_bench.sh: diffusers' UNet2DConditionModel with random weights,
timed the way `stylealign bench` times ours, plain and with StyleAligned, eager and torch.compile.

Models (no download: the architecture comes from the config, the weights from PyTorch's default
initialisation under a fixed seed):
    sd15  runwayml/stable-diffusion-v1-5's UNet config (tools/make_full_unet.py), 512 x 512 px
    sdxl  stabilityai/stable-diffusion-xl-base-1.0's UNet config, 1024 x 1024 px
    --tiny: the test fixtures' tiny configs of the same families, 128 x 128 px

Batch 8 by default (4 images x CFG, [uncond x 4 | cond x 4]); text length 77; timestep 421
(inputs from tools/bench_torch_unet.py's make_inputs). Attention is SDPA (AttnProcessor2_0).

Variants (written from the math in the reference harness's README, not copied):
    plain      no patch
    sa-google  google/style-aligned's StyleAlignedArgs defaults: AdaIN of the projected queries
               and keys (per head channel, over the tokens, unbiased variance, eps 1e-5) to the
               reference row's statistics; the reference row's keys and values appended to every
               row's (rows 0 and B/2 are the references of their CFG halves); every GroupNorm and
               LayerNorm of the UNet run on [own | reference] concatenated along dim -2, own part
               kept (share_group_norm / share_layer_norm, as upstream computes them)
    sa-node    the ComfyUI node's defaults (share_norm both, share_attn q+k, scale 1): AdaIN on the
               attention input before to_q / to_k, the reference's inputs appended before to_k /
               to_v; the same shared norms

Timing: --warmup untimed steps (torch.compile compiles there), then --steps timed steps, each
ended by reading abs(out).mean() back to the host (as ours reads one scalar). Per-op breakdown at
the UNet's shapes (GroupNorm plain and shared, self-attention plain and both variants with the
projections, a 3x3 convolution, the feed-forward's two matmuls), each chained --op-iters times
after as many untimed calls, then synchronised.

Output: with --out FILE, a JSON document rewritten after every measured row (so a run cut short
by a time limit keeps what it measured); with --json, the same document on stdout at the end.
Schema: {"impl":"torch","device","dtype","batch","warmup","steps","op_iters","tiny",
"unet":[{model,size,variant,mode,dtype,warmup_s,ms,median_ms,min_ms,max_ms,out_abs_mean}],
"ops":[{model,op,variant,shape,dtype,ms}],"errors":[{model,what,error}]} (ours adds "notes").

Example:
    python3 tools/gpu_bench_torch.py --device cuda --dtype f16 --model sd15,sdxl \\
        --compile sd15 --out torch.json
    python3 tools/gpu_bench_torch.py --device cpu --dtype f32 --tiny --steps 2 --warmup 1 --json
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)

from bench_torch_unet import make_inputs  # noqa: E402
from make_full_unet import CONFIGS  # noqa: E402

ADAIN_EPS = 1e-5
VARIANTS = ("plain", "sa-google", "sa-node")
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def unet_config(model, tiny):
    if not tiny:
        return dict(CONFIGS[model])
    folder = {"sd15": "tiny_sd15", "sdxl": "tiny_sdxl"}[model]
    with open(os.path.join(ROOT, "tests", "fixtures", "goldens", folder, "unet", "config.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# StyleAligned for a diffusers UNet
# ----------------------------------------------------------------------------------------------
def reference_rows(batch):
    """Row i's reference: 0 in the first CFG half, B/2 in the second (one half for an odd batch)."""
    if batch >= 2 and batch % 2 == 0:
        half = batch // 2
        return [0] * half + [half] * half
    return [0] * batch


def adain(t, ref, dim):
    """t normalised per row over `dim` (unbiased std + eps), given the reference rows' stats."""
    import torch

    mean = t.mean(dim=dim, keepdim=True)
    std = (t.var(dim=dim, keepdim=True, unbiased=True) + ADAIN_EPS).sqrt()
    return (t - mean) / std * std[ref] + mean[ref]


def with_reference(t, ref, dim):
    """[own | reference row's] along `dim`."""
    import torch

    return torch.cat([t, t[ref]], dim=dim)


class SharedSelfAttention:
    """A diffusers attention processor for attn1 layers: StyleAligned's shared self-attention
    (flavour "google": AdaIN on projected q/k; "node": AdaIN on the input)."""

    def __init__(self, flavour, ref):
        self.flavour = flavour
        self.ref = ref

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        import torch.nn.functional as F

        x = hidden_states
        four_d = x.ndim == 4
        if four_d:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)
        residual_in = x
        b, n, _ = x.shape
        heads = attn.heads
        if self.flavour == "node":
            x_qk = adain(x, self.ref, 1)
            q = attn.to_q(x_qk)
            k = attn.to_k(with_reference(x_qk, self.ref, 1))
            v = attn.to_v(with_reference(x, self.ref, 1))
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        d = q.shape[-1] // heads
        q = q.view(b, -1, heads, d).transpose(1, 2)
        k = k.view(b, -1, heads, d).transpose(1, 2)
        v = v.view(b, -1, heads, d).transpose(1, 2)
        if self.flavour == "google":
            q = adain(q, self.ref, 2)
            k = with_reference(adain(k, self.ref, 2), self.ref, 2)
            v = with_reference(v, self.ref, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual_in
        return out / attn.rescale_output_factor


def shared_norm_forward(module, ref):
    """The module's forward on [own | reference] along dim -2, own part kept (upstream's shared
    GroupNorm / LayerNorm)."""
    orig = module.forward

    def forward(x):
        n = x.shape[-2]
        return orig(with_reference(x, ref, x.ndim - 2))[..., :n, :]

    return orig, forward


def install(unet, variant, batch):
    """Patches `unet` in place for `variant`; returns a function that undoes it."""
    import torch.nn as nn
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    if variant == "plain":
        return lambda: None
    ref = reference_rows(batch)
    flavour = "google" if variant == "sa-google" else "node"
    procs = {name: (SharedSelfAttention(flavour, ref) if name.endswith("attn1.processor") else AttnProcessor2_0())
             for name in unet.attn_processors}
    unet.set_attn_processor(procs)
    saved = []
    for m in unet.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            orig, fwd = shared_norm_forward(m, ref)
            m.forward = fwd
            saved.append((m, orig))

    def undo():
        unet.set_attn_processor(AttnProcessor2_0())
        for m, _ in saved:
            del m.forward  # back to the class's forward
    return undo


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------
class Report:
    def __init__(self, args, device_name):
        self.out = args.out
        self.doc = {
            "impl": "torch", "device": device_name, "dtype": args.dtype, "batch": args.batch,
            "warmup": args.warmup, "steps": args.steps, "op_iters": args.op_iters, "tiny": args.tiny,
            "unet": [], "ops": [], "errors": [],
        }

    def add(self, kind, row):
        self.doc[kind].append(row)
        if self.out:
            tmp = self.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.doc, f)
            os.replace(tmp, self.out)


def sync_scalar(t):
    return t.float().abs().mean().item()


def build_unet(args, torch, model, size):
    """The UNet of `model` on the device in the bench dtype, and its inputs."""
    from diffusers import UNet2DConditionModel

    dev = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with dev:
        unet = UNet2DConditionModel.from_config(unet_config(model, args.tiny))
    unet = unet.to(dtype).eval()
    print(f"torch: {model} UNet built on {dev} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    raw = make_inputs(unet.config, args.batch, size, size, 77, torch)
    inputs = {
        "sample": raw["sample"].to(dev, dtype),
        "timestep": raw["timestep"].to(dev),
        "encoder_hidden_states": raw["encoder_hidden_states"].to(dev, dtype),
    }
    if "added_cond_kwargs" in raw:
        inputs["added_cond_kwargs"] = {k: v.to(dev, dtype) for k, v in raw["added_cond_kwargs"].items()}
    return unet, inputs


def time_unet(args, torch, model, size, unet, inputs, mode, report):
    """Times the variants of one model in one mode ("eager": all of them; "compile": those of
    --compile-variants)."""
    for variant in args.variants:
        if mode == "compile" and variant not in args.compile_variants:
            continue
        undo = install(unet, variant, args.batch)
        try:
            if mode == "compile":
                torch._dynamo.reset()
                fn = torch.compile(unet, mode=args.compile_mode)
            else:
                fn = unet
            with torch.inference_mode():
                w0 = time.perf_counter()
                for _ in range(args.warmup):
                    sync_scalar(fn(**inputs, return_dict=False)[0])
                warmup_s = time.perf_counter() - w0
                times, last = [], float("nan")
                for _ in range(args.steps):
                    t = time.perf_counter()
                    last = sync_scalar(fn(**inputs, return_dict=False)[0])
                    times.append((time.perf_counter() - t) * 1e3)
            row = {
                "model": model, "size": size, "variant": variant, "mode": mode, "dtype": args.dtype,
                "warmup_s": round(warmup_s, 3), "ms": round(statistics.fmean(times), 3),
                "median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
                "max_ms": round(max(times), 3), "out_abs_mean": last,
            }
            print(f"torch: {model} {variant} {mode}: {row['ms']:.2f} ms/step (warm-up {warmup_s:.1f} s)", file=sys.stderr)
            report.add("unet", row)
        except Exception as e:  # one failed setting does not end the run
            traceback.print_exc()
            report.add("errors", {"model": model, "what": f"unet {variant} {mode}", "error": repr(e)})
        finally:
            undo()


def time_chain(torch, iters, x, f):
    for _ in range(iters):
        x = f(x)
    sync_scalar(x)
    t = time.perf_counter()
    for _ in range(iters):
        x = f(x)
    sync_scalar(x)
    return (time.perf_counter() - t) * 1e3 / iters


def bench_ops(args, torch, model, size, report):
    import torch.nn as nn
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    dev = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    cfg = unet_config(model, args.tiny)
    b, l = args.batch, size // 8
    channels = cfg["block_out_channels"]
    groups = cfg.get("norm_num_groups", 32)
    heads_cfg = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    if isinstance(heads_cfg, int):
        heads_cfg = [heads_cfg] * len(channels)
    ref = reference_rows(b)
    torch.manual_seed(1)

    def push(op, variant, shape, ms):
        print(f"torch: {model} {op} {variant} {shape}: {ms:.3f} ms", file=sys.stderr)
        report.add("ops", {"model": model, "op": op, "variant": variant, "shape": shape, "dtype": args.dtype, "ms": round(ms, 3)})

    with torch.inference_mode(), dev:
        c0 = channels[0]
        x0 = torch.randn(b, c0, l, l, dtype=dtype)
        gn = nn.GroupNorm(groups, c0, eps=cfg.get("norm_eps", 1e-5)).to(dtype)
        push("group_norm", "plain", [b, c0, l, l], time_chain(torch, args.op_iters, x0, gn))
        _, shared = shared_norm_forward(gn, ref)
        push("group_norm", "shared", [b, c0, l, l], time_chain(torch, args.op_iters, x0, shared))
        conv = nn.Conv2d(c0, c0, 3, padding=1).to(dtype)
        push("conv3x3", "plain", [b, c0, l, l], time_chain(torch, args.op_iters, x0, conv))

        level = next(i for i, t in enumerate(cfg["down_block_types"]) if t.startswith("CrossAttn"))
        c, side, heads = channels[level], l >> level, heads_cfg[level]
        n = side * side
        attn = Attention(query_dim=c, heads=heads, dim_head=c // heads, bias=False, out_bias=True).to(dtype)
        x = torch.randn(b, n, c, dtype=dtype)
        attn.set_processor(AttnProcessor2_0())
        push("attention", "plain", [b, n, c], time_chain(torch, args.op_iters, x, attn))
        for variant, flavour in (("sa-google", "google"), ("sa-node", "node")):
            attn.set_processor(SharedSelfAttention(flavour, ref))
            push("attention", variant, [b, n, c], time_chain(torch, args.op_iters, x, attn))
        ff1, ff2 = nn.Linear(c, 4 * c).to(dtype), nn.Linear(4 * c, c).to(dtype)
        xt = torch.randn(b * n, c, dtype=dtype)
        push("ff_matmul", "plain", [b * n, c, 4 * c], time_chain(torch, args.op_iters, xt, lambda t: ff2(ff1(t))))


def check_goldens(torch):
    """Runs the patches of this file on the tiny golden UNets (float32, CPU) and compares with the
    reference harness's outputs: plain, google's defaults and the node's defaults. Returns the
    number of mismatches (> 1e-4 max abs)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from safetensors import safe_open

    goldens = os.path.join(ROOT, "tests", "fixtures", "goldens")
    bad = 0
    for model in ("sd15", "sdxl"):
        unet = UNet2DConditionModel.from_pretrained(os.path.join(goldens, f"tiny_{model}", "unet")).eval()
        unet.set_attn_processor(AttnProcessor2_0())
        for golden, variant, pick in (
            ("google", "sa-google", lambda c: c.get("label") == "default"),
            ("comfy", "sa-node", lambda c: (c.get("share_norm"), c.get("share_attn"), c.get("scale")) == ("both", "q+k", 1.0)),
        ):
            with safe_open(os.path.join(goldens, f"unet_{model}_cfg8_{golden}.safetensors"), "pt") as g:
                cases = json.loads(g.metadata()["info"])["cases"]
                case = next(c for c in cases if pick(c))
                t = {k: g.get_tensor(k) for k in g.keys() if k.startswith("input.") or k in ("out.unpatched", case["tensor"])}
            inputs = {"sample": t["input.sample"], "timestep": t["input.timestep"], "encoder_hidden_states": t["input.encoder_hidden_states"]}
            if "input.text_embeds" in t:
                inputs["added_cond_kwargs"] = {"text_embeds": t["input.text_embeds"], "time_ids": t["input.time_ids"]}
            batch = inputs["sample"].shape[0]
            for v, want in (("plain", t["out.unpatched"]), (variant, t[case["tensor"]])):
                undo = install(unet, v, batch)
                try:
                    with torch.inference_mode():
                        got = unet(**inputs, return_dict=False)[0]
                finally:
                    undo()
                diff = (got - want).abs().max().item()
                ok = diff <= 1e-4
                bad += not ok
                print(f"check: tiny {model} {v} vs unet_{model}_cfg8_{golden} {case['tensor'] if v != 'plain' else 'out.unpatched'}: "
                      f"max abs diff {diff:.2e} {'ok' if ok else 'MISMATCH'}", file=sys.stderr)
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="torch device (default cuda)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f16", help="compute dtype (default f16)")
    ap.add_argument("--model", default="sd15,sdxl", help="comma-separated: sd15, sdxl (default both)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test configs (dry run)")
    ap.add_argument("--size", type=int, default=0, help="image side in px (default 512 sd15, 1024 sdxl, 128 tiny)")
    ap.add_argument("--batch", type=int, default=8, help="rows per UNet call (default 8 = 4 images x CFG)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per setting (default 3)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting (default 20)")
    ap.add_argument("--op-iters", type=int, default=20, help="timed calls per operation; 0 skips them (default 20)")
    ap.add_argument("--compile", default="sd15",
                    help="models also timed under torch.compile: comma-separated, 'none' or 'all' (default sd15)")
    ap.add_argument("--compile-variants", default="plain,sa-google",
                    help="variants also timed under torch.compile (default plain,sa-google; each one compiles anew)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default 'default')")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's choice)")
    ap.add_argument("--out", help="JSON file, rewritten after every row")
    ap.add_argument("--json", action="store_true", help="print the JSON document on stdout at the end")
    ap.add_argument("--check-goldens", action="store_true",
                    help="only check the StyleAligned patches against the tiny goldens of tests/fixtures (CPU, float32)")
    args = ap.parse_args()
    if args.check_goldens:
        import torch

        return 1 if check_goldens(torch) else 0
    args.model = [m for m in args.model.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.compile_variants = [v for v in args.compile_variants.split(",") if v]
    for m in args.model:
        if m not in CONFIGS:
            ap.error(f"--model: {m!r} is not one of sd15, sdxl")
    for v in args.variants + args.compile_variants:
        if v not in VARIANTS:
            ap.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.op_iters < 0:
        ap.error("--batch and --steps must be >= 1, --warmup and --op-iters >= 0")
    compiled = {"none": [], "all": list(CONFIGS)}.get(args.compile, args.compile.split(","))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = f"{args.device} ({torch.cuda.get_device_name(dev)}; torch {torch.__version__}, CUDA {torch.version.cuda})"
    else:
        name = f"{args.device} ({torch.get_num_threads()} threads; torch {torch.__version__})"
    import diffusers

    report = Report(args, name + f", diffusers {diffusers.__version__}")
    # Eager first for every model, torch.compile last: a run cut short by a time limit loses the
    # slowest settings only.
    kept = {}
    for model in args.model:
        size = args.size or (128 if args.tiny else {"sd15": 512, "sdxl": 1024}[model])
        if args.op_iters:
            try:
                bench_ops(args, torch, model, size, report)
            except Exception as e:
                traceback.print_exc()
                report.add("errors", {"model": model, "what": "ops", "error": repr(e)})
        try:
            unet, inputs = build_unet(args, torch, model, size)
            time_unet(args, torch, model, size, unet, inputs, "eager", report)
            if model in compiled:
                kept[model] = (size, unet, inputs)
            else:
                del unet, inputs
        except Exception as e:
            traceback.print_exc()
            report.add("errors", {"model": model, "what": "unet", "error": repr(e)})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for model, (size, unet, inputs) in kept.items():
        time_unet(args, torch, model, size, unet, inputs, "compile", report)
    if args.json:
        print(json.dumps(report.doc))
    return 0 if report.doc["unet"] or report.doc["ops"] else 1


if __name__ == "__main__":
    sys.exit(main())
