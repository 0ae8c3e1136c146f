#!/usr/bin/env bash
# Everything one GPU lease should check and measure, in stages, each under its own time limit so
# that one stuck stage cannot eat the others. Logs and JSON land in $OUT (default ./gpu-out).
#
#   BUDGET_S=300 bash benchmarks/gpu_session.sh plan      # a 15-minute lease: one call, room for a rerun
#   bash benchmarks/gpu_session.sh env smoke tests kernels  # or any stages, in this order
#
# BUDGET_S caps the whole call: each stage runs under min(its limit, what is left), and a stage
# with under 20 s left is skipped; $OUT/session.tsv lists every stage's rc, seconds and limit (or
# "skipped"), so the next lease starts where this one stopped. `plan` is the open work in priority
# order: env, tests, throughput (ABLATE=fused,compile,xattn_kernel,attention unless set), kernels,
# tune, pack.
#
# Stages: env (GPU, driver, versions), smoke (flamingo-1b, a few steps), demo (train.py on the
# demo preset for DEMO_STEPS, then the same command resuming), tests (the CUDA kernel tests, the
# fused kernels' and the Flamingo cross-attention kernel's bf16 ones included), kernels
# (benchmarks/kernels.py, with the tune stage's pinned configs when it ran), tune (pinned
# attention configs from a multi-repeat tune: benchmarks/tune_attention.py), throughput
# (flamingo-1b with every ablation, or those named in ABLATE=zero3_gather,zero, and a profile of
# the baseline), pack (caption-length data, padded against packed rows). DeepSpeed and webdataset
# must be importable first: see ../shared/device/prepare-wheels.sh for the wheelhouse and install
# lines.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=python3
status=0

BUDGET_S=${BUDGET_S:-0}  # 0: no cap on the whole call
began=$SECONDS
printf 'stage\trc\tseconds\tlimit\n' >"$OUT/session.tsv"

stage() {  # stage NAME SECONDS CMD...: runs CMD under a time limit, logs to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  if [ "$BUDGET_S" -gt 0 ]; then
    local left=$((BUDGET_S - (SECONDS - began)))
    if [ "$left" -lt 20 ]; then
      echo "=== $name: skipped (${left}s of BUDGET_S=${BUDGET_S} left)"
      printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$OUT/session.tsv"
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc $rc in $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$OUT/session.tsv"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}

stages=("$@")
if [ "${1:-}" = plan ]; then
  stages=(env tests throughput kernels tune pack)
  export ABLATE=${ABLATE:-fused,compile,xattn_kernel,attention} STEPS=${STEPS:-4} TESTS_S=${TESTS_S:-150}
fi

for s in "${stages[@]}"; do
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
    kernels)  # with the pinned configs when the tune stage ran first
      [ -f "$OUT/attention-configs.json" ] && export FURNACE_ATTN_CONFIGS="$OUT/attention-configs.json"
      stage kernels "${KERNELS_S:-290}" $py benchmarks/kernels.py --out "$OUT/kernels.json" ;;
    tune)
      stage tune "${TUNE_S:-150}" $py benchmarks/tune_attention.py --head-dims 64,128 --lengths 1024,2048,4096 \
        --repeats "${TUNE_REPEATS:-3}" --out "$OUT/attention-configs.json" ;;
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
