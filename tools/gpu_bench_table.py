#!/usr/bin/env python3
"""One table from tools/gpu_bench.sh's measurements: ours (`stylealign bench --json`) beside
PyTorch's (tools/gpu_bench_torch.py), in ms with the ratios ours / PyTorch, plus the full set
generated through the server. Standard library only.

    gpu_bench_table.py --ours ours_sd15.json [--ours ours_sdxl.json ...] --torch torch.json \\
        [--serve serve.json] [--title TEXT] [--markdown OUT.md]

Each input is one JSON document (schema in tools/gpu_bench_torch.py; ours has the same keys).
Several --ours / --torch files are merged (one per model when they ran as separate processes).
A missing or unreadable file, or a setting one side did not measure, shows as "—"; the errors
the runs recorded are listed under the table. Prints the table (markdown) on stdout and, with
--markdown, writes it there too. Exits 1 when no measurement at all was found.
"""
import argparse
import json
import sys


def load(paths):
    docs = []
    for p in paths:
        try:
            with open(p) as f:
                docs.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"gpu_bench_table: {p}: {e}", file=sys.stderr)
    return docs


def fmt_ms(x):
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def ratio(a, b):
    if a is None or b is None or b <= 0:
        return "—"
    r = a / b
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def size_cell(size):
    return f"{size}² px" if str(size).isdigit() else str(size)


def dtype_mark(ours, theirs):
    """" (f32)" when our row computed in another dtype than PyTorch's."""
    if ours and theirs and ours.get("dtype") and ours.get("dtype") != theirs.get("dtype"):
        return f" ({ours['dtype']})"
    return ""


def merged(docs, key):
    rows = []
    for d in docs:
        rows.extend(d.get(key, []))
    return rows


def header_of(docs, label):
    if not docs:
        return f"{label}: no result"
    d = docs[0]
    return f"{label}: {d.get('device', '?')}, {d.get('dtype', '?')}, batch {d.get('batch', '?')}, " \
           f"{d.get('warmup', '?')} warm-up + {d.get('steps', '?')} timed steps, {d.get('op_iters', '?')} calls per op"


def build(ours_docs, torch_docs, serve, title):
    ours_unet = {(r["model"], r["variant"]): r for r in merged(ours_docs, "unet")}
    torch_unet = {(r["model"], r["variant"], r["mode"]): r for r in merged(torch_docs, "unet")}
    ours_ops = {(r["model"], r["op"], r["variant"]): r for r in merged(ours_docs, "ops")}
    torch_ops = {(r["model"], r["op"], r["variant"]): r for r in merged(torch_docs, "ops")}

    def order(keys):
        models = ["sd15", "sdxl"]
        return sorted(keys, key=lambda k: (models.index(k[0]) if k[0] in models else 9, k[1:]))

    lines = [f"## {title}", "", header_of(ours_docs, "ours"), "", header_of(torch_docs, "PyTorch"), ""]
    lines.append("| what | model | variant | shape / size | ours ms | PyTorch eager ms | PyTorch compile ms "
                 "| ours / eager | ours / compile |")
    lines.append("|---|---|---|---|---:|---:|---:|---:|---:|")
    for model, variant in order({(k[0], k[1]) for k in torch_unet} | set(ours_unet)):
        o = ours_unet.get((model, variant))
        e = torch_unet.get((model, variant, "eager"))
        c = torch_unet.get((model, variant, "compile"))
        size = (o or e or c or {}).get("size", "?")
        om, em, cm = (r["ms"] if r else None for r in (o, e, c))
        lines.append(f"| UNet step | {model} | {variant} | {size_cell(size)} | {fmt_ms(om)}{dtype_mark(o, e or c)} | {fmt_ms(em)} | {fmt_ms(cm)} "
                     f"| {ratio(om, em)} | {ratio(om, cm)} |")
    for key in order(set(torch_ops) | set(ours_ops)):
        model, op, variant = key
        o, t = ours_ops.get(key), torch_ops.get(key)
        shape = "×".join(str(s) for s in (o or t)["shape"])
        om, tm = (r["ms"] if r else None for r in (o, t))
        lines.append(f"| {op} | {model} | {variant} | {shape} | {fmt_ms(om)}{dtype_mark(o, t)} | {fmt_ms(tm)} | — | {ratio(om, tm)} | — |")
    if serve:
        if serve.get("error"):
            cell = f"failed: {serve['error']}"
            lines.append(f"| full set via server | {serve.get('model', '?')} | {serve.get('variant', '?')} | — | {cell} | — | — | — | — |")
        else:
            lines.append(
                f"| full set via server ({serve['images']} images, {serve['steps']} steps, s) | {serve.get('model', '?')} "
                f"| {serve.get('variant', '?')} | {size_cell(serve.get('size', '?'))} | {serve['seconds']:.2f} | — | — | — | — |")
            if serve.get("startup_seconds") is not None:
                lines.append(f"| server start to SERVING (s) | {serve.get('model', '?')} | — | — | {serve['startup_seconds']:.1f} "
                             f"| — | — | — | — |")
    notes = sorted({n for d in ours_docs for n in d.get("notes", [])})
    if notes:
        lines += ["", "Notes:"] + [f"- ours: {n}" for n in notes]
    errors = [("ours", e) for e in merged(ours_docs, "errors")] + [("PyTorch", e) for e in merged(torch_docs, "errors")]
    if errors:
        lines += ["", "Errors:"]
        lines += [f"- {who} {e.get('model', '?')} {e.get('what', '?')}: {e.get('error', '?')}" for who, e in errors]
    lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", action="append", default=[], help="`stylealign bench --json` output (repeatable)")
    ap.add_argument("--torch", action="append", default=[], help="tools/gpu_bench_torch.py output (repeatable)")
    ap.add_argument("--serve", help="the full-set measurement written by tools/gpu_bench.sh")
    ap.add_argument("--title", default="stylealign vs PyTorch: one UNet step, its operations, a full set")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    ours, torch = load(args.ours), load(args.torch)
    serve = (load([args.serve]) or [None])[0] if args.serve else None
    table = build(ours, torch, serve, args.title)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    measured = any(d.get("unet") or d.get("ops") for d in ours + torch) or (serve and not serve.get("error"))
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
