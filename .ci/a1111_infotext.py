#!/usr/bin/env python3
"""Reads stylealign PNGs as AUTOMATIC1111's "PNG Info" does and checks them.

    python3 .ci/a1111_infotext.py [--demo-output demo.txt] IMAGE.png...

For each PNG: Pillow's `Image.info["parameters"]` (the A1111 infotext) is parsed with the
algorithm of A1111's `parse_generation_parameters` (the last line's `key: value` pairs, values in
double quotes unquoted as JSON, `WxH` split into `-1`/`-2`; the lines before it the prompt, then
the negative prompt), and every field is compared with the image's `stylealign` JSON chunk.
With --demo-output (the printed output of `stylealign demo`), also checks that the printed
alignment distance of the style-aligned row is below that of the unaligned row.
"""

import argparse
import json
import re
import sys

from PIL import Image

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras"}


def parse_generation_parameters(x):
    res = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in RE_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[k + "-1"], res[k + "-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    return res


def fail(msg):
    print("a1111_infotext: " + msg, file=sys.stderr)
    sys.exit(1)


def check(path):
    info = Image.open(path).info
    if "parameters" not in info or "stylealign" not in info:
        fail("%s: no `parameters` / `stylealign` text" % path)
    p = parse_generation_parameters(info["parameters"])
    j = json.loads(info["stylealign"])
    want = {
        "Prompt": j["prompt"].strip(),
        "Negative prompt": j["negative_prompt"].strip(),
        "Steps": str(j["steps"]),
        "Sampler": SAMPLERS[j["sampler"]],
        "Seed": str(j["seed"]),
        "Size-1": str(j["width"]),
        "Size-2": str(j["height"]),
        "Model": j["model"],
        "Model hash": j["model_sha256"][:10],
        "StyleAligned flavour": j["options"]["flavour"],
        "StyleAligned image index": str(j["index"]),
    }
    for k, v in want.items():
        if p.get(k) != v:
            fail("%s: %r reads back as %r, expected %r" % (path, k, p.get(k), v))
    if float(p["CFG scale"]) != j["guidance_scale"]:
        fail("%s: CFG scale %r vs %r" % (path, p["CFG scale"], j["guidance_scale"]))
    for k, v in j["options"].items():
        if k != "flavour" and str(p.get("StyleAligned " + k)).lower() != str(v).lower() and float(p.get("StyleAligned " + k, "nan")) != v:
            fail("%s: StyleAligned %s reads back as %r, expected %r" % (path, k, p.get("StyleAligned " + k), v))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-output")
    ap.add_argument("images", nargs="+")
    args = ap.parse_args()
    for path in args.images:
        check(path)
    print("a1111_infotext: %d PNG(s) read back field by field" % len(args.images))
    if args.demo_output:
        text = open(args.demo_output).read()
        d = {m.group(1): float(m.group(2)) for m in re.finditer(r"^alignment distance (\w+): ([0-9.]+)", text, re.M)}
        if not d.get("aligned", 1e9) < d.get("unaligned", -1):
            fail("alignment distances %r: the aligned row is not closer to its reference" % d)
        print("a1111_infotext: alignment distance aligned %.3f < unaligned %.3f" % (d["aligned"], d["unaligned"]))


if __name__ == "__main__":
    main()
