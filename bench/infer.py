"""Inference: prefill and decode throughput and weight memory of exported sparse models vs dense.

Decoding is timed twice: through ``generate`` (eager steps: on a slow host, the host's time) and
through :class:`dsparse.decode.GraphDecoder` (a static cache, each step a CUDA graph replay: the
GPU's time, as serving stacks run it). The latter is also timed for its first token alone (the
prompt's eager prefill), and a step by itself: ``decode_graph_step_ms``, the median replay after a
prefill between two CUDA events, the time per output token that serving reports apart from the time
to the first. (Results before session 20 took it as the difference of the two totals over
``new_tokens - 1`` steps, which carried the eager prefill's host noise into it.)

Each sparse variant goes through :func:`dsparse.export.export_model` and
:func:`dsparse.export.load_for_inference` (cuSPARSELt forward operand only, adapters folded
into it unless ``--fold off``, then multiply-added onto its output; ``--fold on,off`` measures
both from one export), with adapter ranks 0, 1.56% and 6.25% of each layer's smaller dimension.
Weights are random (speed does not depend on them). Ratios are against the dense model
measured in the same process. Dense and sparse models alike run the fused RMSNorm / SwiGLU /
RoPE kernels unless ``--fusion off`` (:func:`dsparse.fuse_model`: in the prefill, and in the
few-row decoding steps where CUDA graphs replay them unless ``--graph_fusion off``), and q/k/v
and gate/up as one product each unless ``--projections off`` (:func:`dsparse.fuse_projections`).

    python -m bench.infer --model llama-1b --batch 8 --prompt 2048 --new_tokens 16

``--profile`` adds each model's prefill GPU time by kernel category (torch.profiler, after the
timing): how much of a prefill the sparse GEMMs can shorten at all, and what adapters add; and a
decoding step taken apart, eager (:func:`profile_decode`: wall, GPU busy and idle time, host time by
function) and captured (:func:`profile_graph_step`: GPU time by kernel).
"""
from __future__ import annotations

import argparse
import gc
import tempfile

import torch

from bench.common import gpu_tag, host_profile, kernel_breakdown, time_ms, write_result
from dsparse import fuse_model, fuse_projections, fused_counts, sparse_modules, sparsify
from dsparse.backends import plans
from dsparse.decode import GraphDecoder
from dsparse.export import export_model, load_for_inference
from dsparse.models import build_model


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameters, buffers and what the sparse products hold frozen: their forward operands, folded
    adapters' ``A`` stacks, and the stacked ``A`` and block-diagonal ``B`` of groups adding adapters after
    the product."""
    tensors = list(model.parameters()) + list(model.buffers())
    owners = {id(owner): owner for owner in (layer.operand_owner() for _, layer in sparse_modules(model))
              if owner._inference is not None}  # a projection group's layers share one operand
    for owner in owners.values():
        tensors.append(owner._inference[1].weight)
        if owner._fold is not None:
            tensors.append(owner._fold.a_wide)
        tensors.extend((getattr(owner, "_adapters", None) or ())[:2])
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(model, args, device) -> dict:
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt), device=device)
    with torch.no_grad():
        # generation's prefill: logits for the last position alone (as generate asks), unless --logits all
        keep = 1 if args.logits == "last" else 0
        prefill = time_ms(lambda: model(input_ids=ids, logits_to_keep=keep), warmup=2, iters=args.iters, inner=1)
        short = ids[:, : args.decode_prompt]
        generate = lambda: model.generate(short, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,  # noqa: E731
                                          do_sample=False, pad_token_id=0)
        decode = time_ms(generate, warmup=1, iters=max(3, args.iters // 3), inner=1)
        # the same greedy decoding on a static cache, each step a CUDA graph replay (as serving stacks run it);
        # timed for the first token alone too (the prompt's eager prefill), and a step by itself: replays after
        # a prefill, each between two CUDA events (the difference of the two medians above carried the eager
        # prefill's host noise, milliseconds, into a step of about two)
        decoder = GraphDecoder(model, args.batch, args.decode_prompt + args.new_tokens,
                               fused_rows=1 if args.graph_fusion == "on" else None)
        decode_graph = time_ms(lambda: decoder(short, args.new_tokens), warmup=1, iters=args.iters, inner=1)
        first_token = time_ms(lambda: decoder(short, 1), warmup=1, iters=args.iters, inner=1)
        decoder.start(short)
        step = time_ms(decoder.step, warmup=1, iters=args.new_tokens - 2, inner=1)  # the cache holds new_tokens
    result = {"prefill_ms": prefill, "prefill_tokens_per_s": args.batch * args.prompt / prefill * 1e3,
              "decode_ms": decode, "decode_tokens_per_s": args.batch * args.new_tokens / decode * 1e3,
              "decode_graph_ms": decode_graph,
              "decode_graph_tokens_per_s": args.batch * args.new_tokens / decode_graph * 1e3,
              "decode_graph_first_token_ms": first_token, "decode_graph_step_ms": step,
              "decode_graph_step_tokens_per_s": args.batch / step * 1e3,
              "weight_gib": weight_bytes(model) / 2**30, "fused_blocks": fused_counts(model)}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, logits_to_keep=keep)
            torch.cuda.synchronize()
        result["prefill_profile"] = kernel_breakdown(prof, 1)
        result["decode_profile"] = profile_decode(model, short)
        result["decode_graph_profile"] = profile_graph_step(decoder, short, args.new_tokens - 2)
    return result


@torch.no_grad()
def profile_decode(model, prompt: torch.Tensor, steps: int = 8) -> dict:
    """One decoding step (a token per sequence on the prompt's KV cache) taken apart: its wall time
    (synchronized), the GPU's busy time and idle gaps by kernel (torch.profiler), and the host's time by
    function (cProfile). Wall near GPU busy: GPU-bound; wall far above it: the host's time is the step."""
    from torch.profiler import ProfilerActivity, profile

    cache = model(input_ids=prompt, use_cache=True).past_key_values
    token = prompt[:, -1:]

    def step() -> None:  # the cache grows by a token a step, as in generation
        model(input_ids=token, past_key_values=cache, use_cache=True)

    step_ms = time_ms(step, warmup=2, iters=steps, inner=1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return {"step_ms": step_ms, **kernel_breakdown(prof, steps), "host": host_profile(step, steps, top=30)}


@torch.no_grad()
def profile_graph_step(decoder: GraphDecoder, prompt: torch.Tensor, steps: int) -> dict:
    """The captured decoding step's GPU time by kernel (torch.profiler over ``steps`` replays after a
    prefill): what the step ratio is made of, product by product."""
    from torch.profiler import ProfilerActivity, profile

    decoder.start(prompt)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step()
        torch.cuda.synchronize()
    return kernel_breakdown(prof, steps)


def _write(results: dict, args: argparse.Namespace) -> None:
    base = results["dense"]
    ratios = {name: {"prefill_speedup": base["prefill_ms"] / r["prefill_ms"],
                     "decode_speedup": base["decode_ms"] / r["decode_ms"],
                     "decode_graph_speedup": base["decode_graph_ms"] / r["decode_graph_ms"],
                     "decode_graph_step_speedup": base["decode_graph_step_ms"] / r["decode_graph_step_ms"],
                     "weight_memory_ratio": r["weight_gib"] / base["weight_gib"]}
              for name, r in results.items() if name != "dense"}
    print(ratios, flush=True)
    write_result(args.out or f"bench/results/infer_{gpu_tag()}.json",
                 {"args": vars(args), "results": results, "vs_dense": ratios,
                  "plans": plans.chosen()})  # how each sparse product ran (cuSPARSELt algorithm, skinny kernel, ...)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--decode_prompt", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--ranks", default="0,0.0156,0.0625", help="adapter rank fractions (0: none)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--fusion", choices=["on", "off"], default="on", help="fused RMSNorm / SwiGLU / RoPE kernels")
    parser.add_argument("--projections", choices=["on", "off"], default="on",
                        help="q/k/v and gate/up as one product each, dense and sparse alike")
    parser.add_argument("--fold", default="on", choices=["on", "off", "on,off"],
                        help="adapters folded into the sparse forward operand (on), multiply-added onto its output "
                             "(off: rows named *_added), or each in turn from one export (on,off)")
    parser.add_argument("--graph_fusion", choices=["on", "off"], default="on",
                        help="CUDA-graph decoding runs the fused kernels on its few-row steps too (on: GraphDecoder's "
                             "fused_rows=1) or HF's code below fusion.min_rows, as eager decoding does (off)")
    parser.add_argument("--logits", choices=["last", "all"], default="last",
                        help="the prefill's logits: the last position's (what generate computes; the default) or "
                             "every position's (runs before session 14 did: the LM head over all 16384 tokens)")
    parser.add_argument("--profile", action="store_true", help="also one prefill and a decoding step per model under torch.profiler, the step under cProfile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.new_tokens < 3:
        parser.error("--new_tokens must be at least 3: a decoding step is timed over the steps after the first "
                     "(one warm-up, then the median of the rest)")
    if args.profile and not args.device.startswith("cuda"):
        parser.error("--profile profiles CUDA kernels: it needs --device cuda")
    fuse = fuse_model if args.fusion == "on" else (lambda model: None)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    with device:  # initialise on the device: a 1B model builds in seconds there
        dense = build_model(args.model, args.vocab, args.prompt).to(dtype).eval()
    fuse(dense)
    if args.projections == "on":
        fuse_projections(dense)
    results = {"dense": measure(dense, args, device)}
    print(f"dense: {results['dense']}", flush=True)
    state = {k: v.cpu() for k, v in dense.state_dict().items()}
    del dense
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    for fraction in [float(f) for f in args.ranks.split(",")]:
        with device:
            model = build_model(args.model, args.vocab, args.prompt)
        model.load_state_dict(state)
        sparsify(model, {"backend": args.backend})
        if fraction > 0:
            gen = torch.Generator().manual_seed(0)
            for _, layer in sparse_modules(model):
                layer.add_adapter(max(1, round(fraction * min(layer.in_features, layer.out_features))),
                                  generator=gen)
                with torch.no_grad():
                    layer.adapter_b.normal_(0, 0.01)
        with tempfile.TemporaryDirectory() as tmp:
            export_model(model, tmp, dtype=dtype)
            del model
            gc.collect()
            folds = args.fold.split(",")
            for fold in folds if fraction > 0 else folds[:1]:  # without adapters there is nothing to fold
                loaded = load_for_inference(tmp, device=device, dtype=dtype, backend=args.backend,
                                            projections=args.projections == "on", fold_adapters=fold == "on")
                fuse(loaded)
                name = f"sparse_r{fraction:g}" + ("_added" if fold == "off" and fraction > 0 else "")
                results[name] = measure(loaded, args, device)
                print(f"{name}: {results[name]}", flush=True)
                _write(results, args)  # after every variant: a run cut off by its time limit keeps what it measured
                del loaded
                gc.collect()
                torch.cuda.empty_cache() if device.type == "cuda" else None


if __name__ == "__main__":
    main()
