"""Checkpoint pieces around DeepSpeed's own: a manifest, atomic ``latest``, signature checks, universal load.

Each checkpoint tag gets ``dsparse.json``: the sparsity signature (every sparse layer's
pattern, shape, storage and adapter rank), the schedule position, and the world size it was
written with. It is written by rank 0 only after every rank finished its DeepSpeed files,
and ``latest`` is then replaced atomically, so an interrupted save is never named by
``latest`` and a tag without a manifest is refused on load.

Changing the data-parallel world size goes through DeepSpeed's universal checkpoint:
``python -m dsparse.checkpoint to-universal CKPT_DIR`` converts a tag and carries the
manifest along; load it with ``"checkpoint": {"load_universal": true}``. DeepSpeed's
universal load restores parameters and optimizer state but not module buffers, so the
masks and schedule counters are restored from the converted model-states file here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import torch
import torch.nn as nn

from .nn import sparse_modules

MANIFEST = "dsparse.json"
FORMAT_VERSION = 1


def sparsity_signature(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per sparse layer: what a checkpoint must match to load into ``model``."""
    return {name: layer.sparsity_signature() for name, layer in sparse_modules(model)}


def signature_differences(saved: dict[str, dict], current: dict[str, dict], limit: int = 5) -> list[str]:
    """Human-readable differences between two sparsity signatures (empty when they agree)."""
    diffs = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            diffs.append(f"layer {name!r} is sparse in the checkpoint but not in this model")
        elif name not in saved:
            diffs.append(f"layer {name!r} is sparse in this model but not in the checkpoint")
        elif saved[name] != current[name]:
            keys = [k for k in current[name] if saved[name].get(k) != current[name][k]]
            diffs.append(f"layer {name!r}: " + ", ".join(
                f"{k} {saved[name].get(k)!r} in the checkpoint vs {current[name][k]!r} here" for k in keys))
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(tag_dir: str, payload: dict[str, Any]) -> None:
    atomic_write_text(os.path.join(tag_dir, MANIFEST), json.dumps({"format": FORMAT_VERSION, **payload}, indent=1))


def read_manifest(tag_dir: str) -> dict[str, Any]:
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.exists(path):
        raise ValueError(
            f"checkpoint {tag_dir} has no {MANIFEST}: it was interrupted while saving, or not written by dsparse "
            "(a universal checkpoint must be converted with `python -m dsparse.checkpoint to-universal`). "
            "Load an earlier tag.")
    with open(path) as f:
        return json.load(f)


def resolve_tag(load_dir: str, tag: str | None, universal: bool) -> str:
    """The tag to load: given, or named by ``latest`` (``latest_universal`` for universal loads)."""
    if tag is not None:
        return tag
    name = "latest_universal" if universal else "latest"
    path = os.path.join(load_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint to resume in {load_dir}: {name} is missing")
    with open(path) as f:
        return f.read().strip()


def restore_buffers(model: nn.Module, model_states_path: str) -> None:
    """Load the module buffers (masks, schedule counters) from a DeepSpeed model-states file."""
    state = torch.load(model_states_path, map_location="cpu", weights_only=False)["module"]
    buffers = {name: state[name] for name, _ in model.named_buffers() if name in state}
    model.load_state_dict(buffers, strict=False)


def to_universal(ckpt_dir: str, tag: str | None = None, workers: int = 1) -> str:
    """Convert ``ckpt_dir/tag`` to DeepSpeed's universal format next to it; returns the new tag."""
    tag = resolve_tag(ckpt_dir, tag, universal=False)
    src = os.path.join(ckpt_dir, tag)
    manifest = read_manifest(src)
    if manifest.get("zero_stage") == 0:
        raise ValueError(f"{src} is a ZeRO stage-0 checkpoint: every rank saved the whole optimizer state, so it "
                         "loads on any data-parallel world size as it is; no conversion needed")
    dst_tag = f"{tag}_universal"
    dst = os.path.join(ckpt_dir, dst_tag)
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
                    "--output_folder", dst, "--inject_missing_state", "--num_extract_workers", str(workers),
                    "--num_merge_workers", str(workers)], check=True)
    write_manifest(dst, {**{k: v for k, v in manifest.items() if k != "format"}, "universal_from": tag})
    atomic_write_text(os.path.join(ckpt_dir, "latest_universal"), dst_tag)
    return dst_tag


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsparse.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("to-universal", help="convert a checkpoint tag for loading on another world size")
    conv.add_argument("ckpt_dir")
    conv.add_argument("--tag", default=None, help="tag to convert (default: the one named by latest)")
    conv.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    print(to_universal(args.ckpt_dir, args.tag, args.workers))


if __name__ == "__main__":
    main()
