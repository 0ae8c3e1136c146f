#!/usr/bin/env bash
# Everything one GPU lease should check and measure, in stages, each under its own time limit so
# that one stuck stage cannot eat the others. Logs and JSON land in $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_session.sh env smoke tests kernels      # first call: does it all run?
#   bash benchmarks/gpu_session.sh throughput                   # second call: the end-to-end numbers
#
# Stages: env (GPU, driver, versions), smoke (flamingo-1b, a few steps), demo (train.py on the
# demo preset for DEMO_STEPS, then the same command resuming), tests (the CUDA kernel tests, the
# fused kernels' and the Flamingo cross-attention kernel's bf16 ones included),
# kernels (benchmarks/kernels.py, the fused kernels' rows included), throughput (flamingo-1b with
# every ablation (fused: model.fused_kernels none vs all among them), or those named in
# ABLATE=zero3_gather,zero, and a profile of the baseline), pack
# (caption-length data, padded against packed rows). DeepSpeed and webdataset must be
# importable first: see ../shared/device/prepare-wheels.sh for the wheelhouse and install lines.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=python3
status=0

stage() {  # stage NAME SECONDS CMD...: runs CMD under a time limit, logs to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc $rc in $((SECONDS - t0))s"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}

for s in "$@"; do
  case $s in
    env)
      stage env 60 bash -c "nvidia-smi; $py -c 'import torch, triton, deepspeed, webdataset, transformers, numpy;
print(torch.__version__, torch.version.cuda, triton.__version__, deepspeed.__version__, transformers.__version__,
numpy.__version__, torch.cuda.get_device_name())'" ;;
    smoke)
      stage smoke "${SMOKE_S:-150}" $py benchmarks/throughput.py --preset flamingo-1b --synthetic-data \
        --warmup 1 --steps 2 --out "$OUT/throughput-smoke.json" ;;
    demo)  # the main job as users start it (NCCL, eval, checkpoint), then the same command resuming
      stage demo "${DEMO_S:-240}" bash -c "$py train.py --set train.max_steps=${DEMO_STEPS:-200} \
        --set train.eval_every=${DEMO_STEPS:-200} --set train.run_dir=/tmp/furnace-demo && \
        $py train.py --set train.max_steps=$((${DEMO_STEPS:-200} + 20)) --set train.eval_every=0 \
        --set train.run_dir=/tmp/furnace-demo" ;;
    tests)
      TAIL=40 stage tests "${TESTS_S:-280}" $py -m pytest -q -p no:cacheprovider -n 8 \
        tests/test_kernels_attention.py tests/test_kernels_loss_scale.py tests/test_kernels_compile.py \
        tests/test_kernels_fused.py tests/test_kernels_media_attention.py ;;
    kernels)
      stage kernels "${KERNELS_S:-290}" $py benchmarks/kernels.py --out "$OUT/kernels.json" ;;
    throughput)
      TAIL=40 stage throughput "${THROUGHPUT_S:-480}" $py benchmarks/throughput.py --preset flamingo-1b \
        --synthetic-data --warmup "${WARMUP:-2}" --steps "${STEPS:-8}" --ablate "${ABLATE:-all}" \
        --profile "$OUT/profile.txt" --out "$OUT/throughput.json" ;;
    pack)  # real caption lengths (LAION-like, 10-40 tokens), padded rows against packed ones
      stage pack "${PACK_S:-300}" $py benchmarks/throughput.py --preset flamingo-1b --caption-data 10,40 \
        --ablate pack --set data.max_images=16 --warmup 1 --steps 4 --out "$OUT/throughput-pack.json" ;;
    *) echo "unknown stage $s"; status=1 ;;
  esac
done
exit $status
