#!/usr/bin/env bash
# The GPU checks and benchmarks, in parts that each fit a 10-minute device call.
#   bash bench/gpu_session.sh tests|speed|step|infer|convergence|nccl
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
case "${1:?part}" in
  tests)        python3 -m pytest -q -m gpu tests kernels ;;
  speed)        timeout 240 python3 -m bench.tune --tokens 8192,16384
                timeout 200 python3 -m bench.layer
                timeout 90 python3 -m bench.kernels --no-sweep ;;
  step)         for m in dense sparse static; do
                  timeout 150 "$DS" --num_gpus 1 bench/step.py --mode $m --out /tmp/step_$m.json; done
                python3 -m bench.step --merge /tmp/step_{dense,sparse,static}.json --result bench/results/engine_${gpu}.json ;;
  infer)        timeout 500 python3 -m bench.infer ;;
  convergence)  timeout 560 python3 -m bench.convergence --gpus 1 ;;
  nccl)         python3 -m pytest -q -m gpu tests/gpu/test_engine_gpu.py
                for m in dense sparse; do
                  timeout 150 "$DS" --num_gpus 2 bench/step.py --mode $m --out /tmp/step2_$m.json; done
                python3 -m bench.step --merge /tmp/step2_{dense,sparse}.json --result bench/results/engine_${gpu}x2.json ;;
  *)            echo "unknown part $1" >&2; exit 2 ;;
esac
status=$?
python3 -m bench.report >/dev/null 2>&1
[ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" bench/results dsparse/backends/tuned 2>/dev/null
exit $status
