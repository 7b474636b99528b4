"""Export a trained sparse model for inference, and load it back as a fast sparse (+ low-rank) model.

An export directory holds ``config.json`` (the HF model config), ``model.safetensors`` (the
kept values, their uint8 positions and the adapters of every sparse layer; the other
weights dense; training-only state such as the double-pruning mask is dropped) and
``dsparse.json`` (each sparse layer's pattern and adapter rank/scale).

    python -m dsparse.export runs/my-1b/checkpoints runs/my-1b/export --hf_config runs/my-1b/hf_config
    model = dsparse.export.load_for_inference("runs/my-1b/export", device="cuda")
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from . import checkpoint as ckpt
from .nn import fuse_projections, sparse_modules, sparsify

META = "dsparse.json"
TRAINING_ONLY = ("keep_t", "mask_step")


def _consolidated_state_dict(ckpt_dir: str, tag: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full state dict of a dsparse DeepSpeed checkpoint (any ZeRO stage), and its manifest."""
    tag = ckpt.resolve_tag(ckpt_dir, tag, universal=False)
    manifest = ckpt.read_manifest(os.path.join(ckpt_dir, tag))
    if manifest.get("zero_stage", 0) == 0:
        path = os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt")
        return torch.load(path, map_location="cpu", weights_only=False)["module"], manifest
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag), manifest


def save_export(state_dict: dict[str, torch.Tensor], config: PretrainedConfig, layers: dict[str, dict],
                out_dir: str, dtype: torch.dtype = torch.bfloat16, adapter_alpha: float = 1.0) -> None:
    """Write an export directory from a model's state dict and its sparse layers' signatures."""
    os.makedirs(out_dir, exist_ok=True)
    tensors, seen = {}, set()
    for name, value in state_dict.items():
        if name.rsplit(".", 1)[-1] in TRAINING_ONLY or (value.data_ptr(), value.shape) in seen:
            continue  # training-only state, or a tied weight already written (the model re-ties it)
        seen.add((value.data_ptr(), value.shape))
        value = value.detach().cpu()
        tensors[name] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    config.save_pretrained(out_dir)
    ckpt.atomic_write_text(os.path.join(out_dir, META), json.dumps(
        {"layers": layers, "adapter_alpha": adapter_alpha, "dtype": str(dtype).removeprefix("torch.")}, indent=1))


def export_model(model: nn.Module, out_dir: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Export an in-memory sparse model (e.g. after training without DeepSpeed)."""
    layers = {name: layer.sparsity_signature() for name, layer in sparse_modules(model)}
    alpha = next((layer.adapter_scale * layer.adapter_rank for _, layer in sparse_modules(model)
                  if layer.has_adapter), 1.0)
    save_export(model.state_dict(), model.config, layers, out_dir, dtype, alpha)


def export_checkpoint(ckpt_dir: str, out_dir: str, hf_config: str, tag: str | None = None,
                      dtype: torch.dtype = torch.bfloat16) -> None:
    """Export a dsparse DeepSpeed checkpoint; ``hf_config`` is the model's config dir or config.json."""
    state, manifest = _consolidated_state_dict(ckpt_dir, tag)
    config = AutoConfig.from_pretrained(hf_config if os.path.isdir(hf_config) else os.path.dirname(hf_config),
                                        local_files_only=True)
    adapters = (manifest.get("sparsity") or {}).get("adapters") or {}
    save_export(state, config, manifest["layers"], out_dir, dtype, float(adapters.get("alpha", 1.0)))


def load_for_inference(export_dir: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                       backend: str = "auto", release_state: bool = True, projections: bool = True,
                       fold_adapters: bool = True) -> nn.Module:
    """A causal LM with the exported sparse layers, frozen for inference (forward operands only).

    Sparse layers run on cuSPARSELt where it can (``backend="auto"``), with their adapters
    folded into the forward operand (``fold_adapters``: one GEMM per product) or else
    multiply-added onto the sparse output in one fused pass; with ``projections`` q/k/v and
    gate/up run as one product each (:func:`dsparse.nn.fuse_projections`); see
    :meth:`dsparse.SparseLinear.prepare_inference` for ``release_state`` and ``fold_adapters``.
    """
    with open(os.path.join(export_dir, META)) as f:
        meta = json.load(f)
    config = AutoConfig.from_pretrained(export_dir, local_files_only=True)
    with torch.device(device or "cpu"):  # build, prune and load where it will run (fast on a GPU)
        model = AutoModelForCausalLM.from_config(config)
    layers = meta["layers"]
    if layers:
        names = [f"^{re.escape(name)}$" for name in layers]
        patterns = [{"match": n, "pattern": sig["pattern"]} for n, sig in zip(names, layers.values())]
        double_prune = all(sig.get("double_prune", True) for sig in layers.values())
        sparsify(model, {"include": names, "layer_patterns": patterns, "exclude_output_head": False,
                         "backend": backend, "double_prune": double_prune, "mask_change_freq": 0})
    for name, layer in sparse_modules(model):
        if layers[name].get("adapter_rank"):
            layer.add_adapter(layers[name]["adapter_rank"], alpha=meta.get("adapter_alpha", 1.0))
    state = load_file(os.path.join(export_dir, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[-1] not in TRAINING_ONLY]
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{export_dir} does not match its config: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.to(device=device, dtype=dtype or getattr(torch, meta.get("dtype", "bfloat16"))).eval()
    if projections:
        fuse_projections(model)
    for _, layer in sparse_modules(model):
        layer.prepare_inference(release_state=release_state, fold_adapters=fold_adapters)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsparse.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", help="a dsparse DeepSpeed checkpoint directory (holds 'latest')")
    parser.add_argument("out_dir")
    parser.add_argument("--hf_config", required=True, help="the model's HF config dir or config.json")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    export_checkpoint(args.ckpt_dir, args.out_dir, args.hf_config, args.tag, getattr(torch, args.dtype))
    print(f"exported to {args.out_dir}")


if __name__ == "__main__":
    main()
