#!/usr/bin/env bash
# The GPU checks and benchmarks, in parts that each fit a 10-minute device call (several per call where
# they fit):   bash bench/gpu_session.sh PART [PART ...]
#   tests        pytest -m gpu over tests/ and kernels/
#   tests-unrun  the GPU tests of code written while no GPU was lent (sessions 17-18: the mma.sp probe and kernel,
#                cuSPARSELt's split-k plans, fused CUDA-graph decoding steps, the fused weight gradient); first run in
#                session 19 on an H200: all passed but split-k's, which cuSPARSELt refuses from Hopper on
#   tune         tune the plans of the benchmarked shapes (shipped in dsparse/backends/tuned)
#   tune-decode  tune llama-1b's forward products at decoding's 8 and 16 tokens, and at 8 with folded adapters (cuSPARSELt, with its split-k
#                before Hopper, vs the few-token kernels vs dense), timed as CUDA graph replays (dsparse.decode.GraphDecoder runs the step so), before
#                'infer' (which would tune them on first use)
#   tune-dw      tune the weight gradients of the benchmarked shapes and of llama-1b's step (8 x 2048 tokens): the exact
#                one (cuBLAS + gather vs the fused Triton GEMM's tiles), then the MVUE one (cuSPARSELt's algorithms, whole,
#                vs that exact one), in $DTYPES (bf16 fp16) (tune_<gpu>_dw*.json; plans shipped as 'tune's), before 'layer' and the step parts
#   layer        one layer dense vs sparse (MVUE dW included)
#   kernels      the Triton kernels vs their torch references
#   skinny       the few-token kernel's tile and split-k sweep on llama-1b's decode products (kernels_<gpu>_skinny.json)
#   skinny-mma   the few-token kernel on the sparse tensor cores (kernels.skinny_mma, CUDA C++ built on first use):
#                its GPU tests, then the skinny sweep with it beside the Triton kernel (kernels_<gpu>_skinny_mma.json)
#   overhead     host time per call of one layer's products, and its profile
#   fp8          FP8 (e4m3) 2:4 products vs bf16 and dense FP8
#   step         ~1B LLaMA, ZeRO-2 bf16, one GPU: dense vs dsparse; also with torch's threaded backward, and
#                that without the fused RMSNorm/SwiGLU (HF's modules, torch's defaults)
#   repeats      dense and dsparse (the defaults) interleaved, $REPEATS (3) runs of 30 steps each, pooled, clocks logged
#                (replaces earlier repeats: a pooled result comes from one machine)
#   overlap      the llama-1b step of 'step' without ZeRO's overlap_comm (it synchronizes the GPU at each bucket flush)
#   step-more    the same with static 2:4 and with activation checkpointing
#   step-7b      a 7B-shaped 4-layer slice, 4x2048 tokens: dense, dsparse, dsparse+MVUE (engine_<gpu>_llama7b_4layers.json)
#   profile      the llama-1b step of 'step', dense and dsparse, under torch.profiler: GPU time by kernel category
#                and GPU idle time, then under cProfile: host time by function (replaces earlier profiles; profile-more and profile-overlap add to it)
#   profile-more the same with torch's threaded backward, and that without the fused RMSNorm/SwiGLU
#   profile-mvue dense, dsparse and dsparse+MVUE profiled the same way, apart (engine_<gpu>_mvue_profile.json)
#   profile-overlap  the same without ZeRO's overlap_comm: where the GPU idles, with and without its syncs
#   mvue         dense, dsparse and dsparse with MVUE weight gradients (sparse dW GEMMs), llama-1b, 30 steps each,
#                interleaved $REPEATS (1) times, pooled
#   syncs        dense, dsparse and dsparse+MVUE, llama-1b, with DeepSpeed's per-step host syncs and without
#                (the default), interleaved $REPEATS (1) times, pooled
#   proj         dense, dsparse and dsparse+MVUE, llama-1b, with q/k/v and gate/up as one product each (the
#                default) and apart, interleaved $REPEATS (1) times, pooled
#   mbs          dense, dsparse and dsparse+MVUE, llama-1b, micro-batch $MBS (16) x 2048 tokens: the host's share of
#                a step halves against 'proj''s 8 (engine_<gpu>_mbs<MBS>.json)
#   ga           the same with $GA (4) micro-batches of 8 x 2048 tokens per optimizer step (engine_<gpu>_ga<GA>.json)
#   swiglu-mvue  sparse+MVUE with gate/up's MVUE operand written by SwiGLU's backward (the default) and by a pass
#                of its own, and dense, interleaved $REPEATS (2) times (engine_<gpu>_swiglu_mvue.json); then
#                mvue_compress and mvue_compress_swiglu alone on llama-1b's shapes (kernels_<gpu>_mvue.json)
#   memory       a 7B-shaped 8-layer slice, 1x2048 tokens, activation checkpointing: model state dominates
#   infer        prefill/decode of exported models vs dense, with each prefill's profile; adapters folded into the
#                sparse operand, and (rows *_added) multiply-added after the product
#   infer-graphs the same without profiles or unfolded adapters, with the captured decoding steps running the fused
#                kernels and HF's code (infer_<gpu>_graphs_fusion_{on,off}.json)
#   infer-7b     'infer' on LLaMA-7B's shapes (32 blocks, 4096 hidden), folded adapters, with profiles: prefill's
#                GEMMs are a larger share than llama-1b's (infer_<gpu>_llama7b.json)
#   convergence  gpt2-small dense vs dsparse vs static at equal tokens
#   convergence-mvue  a shorter run (300 steps): dense vs dsparse vs dsparse with MVUE weight gradients
#   nccl         the 2-GPU engine test and step benchmark, with one GPU of the same host for scale (needs 2 GPUs)
# Results land in bench/results/ (and, packed as results.tgz, in $OUT when set). Needs deepspeed & co.:
# carry .whl (bash ../shared/device/wheels.sh) and install it first, as the device README says.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} NCCL_NVLS_ENABLE=0
DS=$(command -v deepspeed || echo /tmp/site/bin/deepspeed)
gpu=$(python3 -c "from bench.common import gpu_tag; print(gpu_tag())")
# tuned plans go to the package's shipped plans for this GPU and cuSPARSELt version
export DSPARSE_PLANS=${DSPARSE_PLANS:-$(python3 -c "from dsparse.backends.plans import TUNED_DIR, device_key
print(f'{TUNED_DIR}/plans_{device_key()}.json')")}
runs=bench/results/step_runs
mkdir -p $runs/profile

step() {  # step GPUS MODEL LABEL ARGS...: one timed engine run into $runs/MODEL_LABEL.json
  local gpus=$1 model=$2 label=$3; shift 3
  timeout 140 "$DS" --num_gpus "$gpus" bench/step.py --model "$model" --out "$runs/${model}_${label}.json" "$@"
}
profile() {  # profile MODE SUFFIX [ARGS]: a short run of the llama-1b step with two steps profiled, into $runs/${dir:-profile}
  local mode=$1 suffix=$2; shift 2
  timeout 140 "$DS" --num_gpus 1 bench/step.py --model llama-1b --mode "$mode" --warmup 3 --steps 5 --profile 2 --host_profile 2 \
    --out "$runs/${dir:-profile}/llama-1b_${mode}${suffix}.json" "$@"
}
merge() {  # merge RESULT FILES...
  local result=$1; shift
  python3 -m bench.step --merge "$@" --result "$result"
}

status=0
for part in "$@"; do
  echo "=== $part $(date +%T)"
  case "$part" in
    tests)        timeout 450 python3 -m pytest -q -m gpu tests kernels ;;
    tests-unrun)  timeout 400 python3 -m pytest -q -m gpu kernels/tests/test_kernels_skinny_mma.py \
                    kernels/tests/test_kernels_kept_grad.py tests/gpu/test_cslt_binding_gpu.py tests/gpu/test_plans_gpu.py \
                    tests/gpu/test_decode_gpu.py tests/test_fused.py ;;
    tune)         timeout 240 python3 -m bench.tune --tokens 8192,16384 ;;
    tune-decode)  timeout 200 python3 -m bench.tune --shapes 2048x2560,2048x2048,2048x11264,5632x2048 --tokens 8,16 \
                    --dtypes bf16 --roles fwd --timing graph --out bench/results/tune_${gpu}_decode.json
                  # the same products widened by folded adapters (r = 1.56% / 6.25%: k + 64 / k + 256)
                  timeout 150 python3 -m bench.tune --shapes 2112x2560,2112x2048,2112x11264,5696x2048,2304x2560,2304x2048,2304x11264,5888x2048 \
                    --tokens 8 --dtypes bf16 --roles fwd --timing graph --out bench/results/tune_${gpu}_decode_folded.json ;;
    tune-dw)      for d in ${DTYPES:-bf16 fp16}; do timeout 300 python3 -m bench.tune --roles dw,dw_mvue --tokens 4096,8192,16384 \
                    --dtypes $d --out bench/results/tune_${gpu}_dw_$d.json; done
                  timeout 150 python3 -m bench.tune --roles dw,dw_mvue --shapes 2048x2560,2048x2048,2048x11264,5632x2048 \
                    --tokens 16384 --dtypes bf16 --out bench/results/tune_${gpu}_dw_llama1b.json ;;
    layer)        timeout 300 python3 -m bench.layer ;;  # 24 rows took ~250 s on an H200
    kernels)      timeout 90 python3 -m bench.kernels --no-sweep ;;
    skinny)       timeout 150 python3 -m bench.kernels --sections skinny --out bench/results/kernels_${gpu}_skinny.json ;;
    skinny-mma)   timeout 300 python3 -m pytest -q -m gpu kernels/tests/test_kernels_skinny_mma.py
                  timeout 150 python3 -m bench.kernels --sections skinny --out bench/results/kernels_${gpu}_skinny_mma.json ;;
    overhead)     timeout 120 python3 -m bench.overhead ;;
    fp8)          timeout 150 python3 -m bench.fp8 ;;
    step)         step 1 llama-1b dense --mode dense; step 1 llama-1b sparse --mode sparse
                  step 1 llama-1b dense_threaded --mode dense --autograd_threads
                  step 1 llama-1b sparse_threaded --mode sparse --autograd_threads
                  step 1 llama-1b dense_unfused_threaded --mode dense --fusion off --autograd_threads
                  step 1 llama-1b sparse_unfused_threaded --mode sparse --fusion off --autograd_threads
                  merge bench/results/engine_${gpu}.json $runs/llama-1b_*.json ;;
    repeats)      mkdir -p $runs/llama-1b_repeats bench/results/clocks; rm -f $runs/llama-1b_repeats/*.json
                  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
                    --format=csv -lms 250 > bench/results/clocks/step_${gpu}_repeats_clocks.csv & clocks=$!
                  for i in $(seq "${REPEATS:-3}"); do for m in dense sparse; do
                    step 1 llama-1b repeats/${m}_$i --mode $m --steps 30; done; done
                  kill $clocks
                  merge bench/results/engine_${gpu}_repeats.json $runs/llama-1b_repeats/*.json ;;
    overlap)      step 1 llama-1b dense_no_overlap --mode dense --overlap_comm off
                  step 1 llama-1b sparse_no_overlap --mode sparse --overlap_comm off
                  merge bench/results/engine_${gpu}.json $runs/llama-1b_*.json ;;
    step-more)    step 1 llama-1b dense_gc --mode dense --grad_ckpt; step 1 llama-1b sparse_gc --mode sparse --grad_ckpt
                  step 1 llama-1b static --mode static
                  merge bench/results/engine_${gpu}.json $runs/llama-1b_*.json ;;
    step-7b)      step 1 llama-7b dense --mode dense --layers 4 --micro_batch_size 4
                  step 1 llama-7b sparse --mode sparse --layers 4 --micro_batch_size 4
                  step 1 llama-7b sparse_mvue --mode sparse --mvue_dw --layers 4 --micro_batch_size 4
                  merge bench/results/engine_${gpu}_llama7b_4layers.json $runs/llama-7b_{dense,sparse,sparse_mvue}.json ;;
    profile)      rm -f $runs/profile/*.json; profile dense ""; profile sparse ""
                  merge bench/results/engine_${gpu}_profile.json $runs/profile/llama-1b_*.json ;;
    profile-more) for m in dense sparse; do profile $m _threaded --autograd_threads
                    profile $m _unfused_threaded --fusion off --autograd_threads; done
                  merge bench/results/engine_${gpu}_profile.json $runs/profile/llama-1b_*.json ;;
    profile-mvue) dir=profile_mvue; mkdir -p $runs/$dir; rm -f $runs/$dir/*.json
                  profile dense ""; profile sparse ""; profile sparse _mvue --mvue_dw; dir=
                  merge bench/results/engine_${gpu}_mvue_profile.json $runs/profile_mvue/llama-1b_*.json ;;
    profile-overlap) for m in dense sparse; do profile $m _no_overlap --overlap_comm off; done
                  merge bench/results/engine_${gpu}_profile.json $runs/profile/llama-1b_*.json ;;
    mvue)         mkdir -p $runs/llama-1b_mvue; rm -f $runs/llama-1b_mvue/*.json
                  for i in $(seq "${REPEATS:-1}"); do
                    for m in dense sparse; do step 1 llama-1b mvue/${m}_$i --mode $m --steps 30; done
                    step 1 llama-1b mvue/sparse_mvue_$i --mode sparse --mvue_dw --steps 30; done
                  merge bench/results/engine_${gpu}_mvue.json $runs/llama-1b_mvue/*.json ;;
    syncs)        mkdir -p $runs/llama-1b_syncs; rm -f $runs/llama-1b_syncs/*.json
                  for i in $(seq "${REPEATS:-1}"); do for h in on off; do
                    for m in dense sparse; do step 1 llama-1b syncs/${m}_h${h}_$i --mode $m --steps 20 --host_syncs $h; done
                    step 1 llama-1b syncs/sparse_mvue_h${h}_$i --mode sparse --mvue_dw --steps 20 --host_syncs $h; done; done
                  merge bench/results/engine_${gpu}_syncs.json $runs/llama-1b_syncs/*.json ;;
    proj)         mkdir -p $runs/llama-1b_proj; rm -f $runs/llama-1b_proj/*.json
                  for i in $(seq "${REPEATS:-1}"); do for p in ${PROJ:-on off}; do
                    for m in dense sparse; do step 1 llama-1b proj/${m}_p${p}_$i --mode $m --steps 20 --projections $p; done
                    step 1 llama-1b proj/sparse_mvue_p${p}_$i --mode sparse --mvue_dw --steps 20 --projections $p; done; done
                  merge bench/results/engine_${gpu}_proj.json $runs/llama-1b_proj/*.json ;;
    mbs)          b=${MBS:-16}; mkdir -p $runs/llama-1b_mbs$b; rm -f $runs/llama-1b_mbs$b/*.json
                  for m in dense sparse; do step 1 llama-1b mbs$b/$m --mode $m --steps 20 --micro_batch_size $b; done
                  step 1 llama-1b mbs$b/sparse_mvue --mode sparse --mvue_dw --steps 20 --micro_batch_size $b
                  merge bench/results/engine_${gpu}_mbs$b.json $runs/llama-1b_mbs$b/*.json ;;
    ga)           a=${GA:-4}; mkdir -p $runs/llama-1b_ga$a; rm -f $runs/llama-1b_ga$a/*.json
                  for m in dense sparse; do step 1 llama-1b ga$a/$m --mode $m --warmup 2 --steps 8 --grad_accum $a; done
                  step 1 llama-1b ga$a/sparse_mvue --mode sparse --mvue_dw --warmup 2 --steps 8 --grad_accum $a
                  merge bench/results/engine_${gpu}_ga$a.json $runs/llama-1b_ga$a/*.json ;;
    swiglu-mvue)  mkdir -p $runs/llama-1b_swiglu_mvue; rm -f $runs/llama-1b_swiglu_mvue/*.json
                  for i in $(seq "${REPEATS:-2}"); do step 1 llama-1b swiglu_mvue/dense_$i --mode dense --steps 20
                    for s in on off; do step 1 llama-1b swiglu_mvue/sparse_mvue_${s}_$i --mode sparse --mvue_dw \
                      --steps 20 --swiglu_mvue $s; done; done
                  merge bench/results/engine_${gpu}_swiglu_mvue.json $runs/llama-1b_swiglu_mvue/*.json
                  timeout 120 python3 -m bench.kernels --sections mvue,swiglu_mvue --mvue 16384x2560,16384x2048,16384x11264 \
                    --fused 16384,2048,5632 --out bench/results/kernels_${gpu}_mvue.json ;;
    memory)       step 1 llama-7b dense_8l_gc --mode dense --layers 8 --micro_batch_size 1 --grad_ckpt
                  step 1 llama-7b sparse_8l_gc --mode sparse --layers 8 --micro_batch_size 1 --grad_ckpt
                  merge bench/results/engine_${gpu}_llama7b_8layers_gc.json $runs/llama-7b_*_8l_gc.json ;;
    infer)        timeout 400 python3 -m bench.infer --profile --fold on,off ;;
    infer-7b)     timeout 500 python3 -m bench.infer --model llama-7b --profile --out bench/results/infer_${gpu}_llama7b.json ;;
    infer-graphs) for f in on off; do timeout 260 python3 -m bench.infer --fold on --graph_fusion $f \
                    --out bench/results/infer_${gpu}_graphs_fusion_$f.json; done ;;
    convergence)  timeout 560 python3 -m bench.convergence --gpus 1 ;;
    convergence-mvue) timeout 330 python3 -m bench.convergence --gpus 1 --modes dense,dsparse,dsparse_mvue \
                    --max_steps 300 --out bench/results/convergence_${gpu}_mvue.json ;;
    nccl)         timeout 300 python3 -m pytest -q -m gpu tests/gpu/test_engine_gpu.py
                  mkdir -p $runs/llama-1b_x2  # the 2-GPU host's runs, apart from the one-GPU machine's
                  for m in sparse dense; do step 1 llama-1b x2/${m}_1gpu --mode $m; done
                  step 2 llama-1b x2/dense --mode dense; step 2 llama-1b x2/sparse --mode sparse
                  merge bench/results/engine_${gpu}x2.json $runs/llama-1b_x2/*.json ;;
    *)            echo "unknown part $part" >&2; exit 2 ;;
  esac
  status=$(( status | $? ))
  python3 -m bench.report >/dev/null 2>&1
  [ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" bench/results dsparse/backends/tuned README.md 2>/dev/null
done
exit $status
