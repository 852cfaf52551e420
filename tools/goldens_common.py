"""Shared by the golden generator scripts (make_control_goldens.py, make_single_file_goldens.py,
make_lora_goldens.py).

Import it before torch: at import it sets the environment (one OpenMP thread, hub offline, quiet
diffusers / transformers), then imports torch with one thread and turns off the progress bars.

It holds what the scripts share: `gen`, `mad`, `randomize_norm_affine`, `versions`, `write_json`,
`Out` (collects one run's files and their manifest entries, tagged with the script's name),
`compare` (the bitwise `--check` comparison), `merge_manifest` (replaces only one script's entries
in manifest.json), `arg_parser` (`--check`, `--out DIR`) and `check_or_write` (the driver of
those modes and of the default one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(1)

import diffusers  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
import diffusers.utils.logging as _dlog  # noqa: E402
import transformers.utils.logging as _tlog  # noqa: E402

_dlog.disable_progress_bar()
_tlog.disable_progress_bar()

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "fixtures" / "goldens"
SIZE_LIMIT = 2_000_000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def randomize_norm_affine(model: torch.nn.Module, seed: int):
    """Norm layers start as weight=1 / bias=0; make them random (as the refharness tiny models)."""
    g = gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def versions(*extra) -> dict:
    """Python, torch, diffusers, transformers and safetensors versions, plus those of the `extra` modules."""
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
         "transformers": transformers.__version__, "safetensors": safetensors.__version__}
    v.update({m.__name__: m.__version__ for m in extra})
    return v


def write_json(path: Path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(path, 0o644)


class Out:
    """Collects the files of one run (into `root`) and their manifest entries; every entry and every
    golden's `info` records `generator` (the script that wrote it)."""

    def __init__(self, root: Path, generator: str):
        self.root = root
        self.generator = generator
        self.entries: dict = {}
        self.files: list[str] = []

    def tensors(self, rel: str, tensors: dict, info: dict):
        tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
        for k, v in tensors.items():
            assert v.dtype in (torch.float32, torch.int64), (rel, k, v.dtype)
            assert torch.isfinite(v.double()).all(), (rel, k)
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        info = dict(info, generator=self.generator)
        save_file(tensors, str(path), metadata={"info": json.dumps(info, sort_keys=True, allow_nan=False)})
        os.chmod(path, 0o644)
        size = path.stat().st_size
        assert size < SIZE_LIMIT, f"{rel}: {size} bytes (limit 2 MB)"
        entry = dict(info)
        entry["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                            for k, v in tensors.items()}
        entry["size_bytes"] = size
        self.entries[rel] = entry
        self.files.append(rel)

    def plain(self, rel: str, entry: dict):
        """A file the script has already written under `root`."""
        path = self.root / rel
        os.chmod(path, 0o644)
        size = path.stat().st_size
        assert size < SIZE_LIMIT, f"{rel}: {size} bytes (limit 2 MB)"
        self.entries[rel] = dict(entry, generator=self.generator, size_bytes=size)
        self.files.append(rel)

    def folder(self, rel: str, entry: dict):
        """A folder the script has already written under `root`: one entry `rel/` listing its files."""
        d = self.root / rel
        files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
        for f in files:
            os.chmod(d / f, 0o644)
            assert (d / f).stat().st_size < SIZE_LIMIT, f"{rel}/{f} over 2 MB"
        self.entries[rel + "/"] = dict(entry, files=files, generator=self.generator,
                                       size_bytes=sum((d / f).stat().st_size for f in files))
        self.files += [f"{rel}/{f}" for f in files]


def compare(new: Out, old_root: Path) -> list[str]:
    """Every file of `new` byte for byte against `old_root` (safetensors: also tensor by tensor and the
    metadata, to say what differs), and every entry of `new` against `old_root/manifest.json`."""
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


def merge_manifest(path: Path, entries: dict, generator: str, generator_versions: dict):
    """Read-modify-write: only `entries` and `generator_versions[generator]` are replaced, everything
    else is kept."""
    m = json.loads(path.read_text())
    m.setdefault("files", {}).update(entries)
    m.setdefault("generator_versions", {})[generator] = generator_versions
    tmp = path.with_name(f"{path.name}.tmp-{Path(generator).stem}")
    with open(tmp, "w") as f:
        f.write(json.dumps(m, indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def arg_parser(doc: str) -> tuple[argparse.ArgumentParser, argparse._MutuallyExclusiveGroup]:
    """The scripts' command line: `--check` or `--out DIR` (the returned group, for more exclusive modes)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare")
    g.add_argument("--out", type=Path, help="write into this folder instead (no manifest update)")
    return ap, g


def check_or_write(generate: Callable[[Path], Out], check: bool, out_dir: Path | None, generator_versions: dict) -> int:
    """`check`: generate into a temporary folder and `compare` with GOLDENS. Otherwise generate into
    `out_dir`, or into GOLDENS and merge the entries into its manifest.json."""
    if check:
        with tempfile.TemporaryDirectory() as tmp:
            out = generate(Path(tmp))
            fails = compare(out, GOLDENS)
        if fails:
            print("\n".join(fails))
            print(f"CHECK FAILED: {len(fails)} differences")
            return 1
        print(f"CHECK OK: {len(out.files)} regenerated files bitwise identical, manifest entries equal")
        return 0
    root = out_dir if out_dir else GOLDENS
    root.mkdir(parents=True, exist_ok=True)
    out = generate(root)
    if out_dir is None:
        merge_manifest(GOLDENS / "manifest.json", out.entries, out.generator, generator_versions)
    print(f"wrote {len(out.files)} files")
    return 0
