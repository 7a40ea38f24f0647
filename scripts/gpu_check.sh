#!/usr/bin/env bash
# Issue 5's GPU checks, in two calls of the device tool (docs/speed.md, "On a GPU"):
#
#   here:  bash scripts/gpu_wheels.sh
#   then:  device run, carry [".whl"], timeout_s 590, command "bash scripts/gpu_check.sh"
#   then, at once while the machine is warm (30 s):
#          device run, carry [".whl"], timeout_s 150, command "STAGE=profile bash scripts/gpu_check.sh"
#
# Builds a 1.1B Qwen2-architecture target and its first-layers draft on the GPU.
# STAGE=bench (the default): measures plain and speculative decoding, compiled (CUDA graphs;
#   greedy tokens read back in bursts and, beside it, one at a time) and transformers' eager
#   modes, bfloat16 then float32 (python -m specdecode.bench.synthetic; 533 s on an H100 in the
#   first run, with our eager modes, which --modes now leaves out: they were measured then,
#   docs/results/gpu-h100; the profile is a call of its own). Every stage of it rewrites
#   $OUT/results.{json,md}, so a run cut short still returns what it measured. Extra arguments go
#   to the benchmark (e.g. --eps 0.1).
# STAGE=frozen: plain decoding compiled with inductor's freezing (fused q/k/v and gate/up
#   products; StaticSession's freeze) beside the unfrozen compiled loop and transformers, both
#   dtypes (not yet run on a GPU; about 3-4 minutes by the stage times of the first run: run it
#   instead of the profile where a session has the time for one of them).
# STAGE=profile: profiles one compiled bfloat16 decoding step and one verification pass (python
#   -m specdecode.bench.step_profile: products, attention, other kernels, host; about 80 s).
# Together about 11 minutes of the 15 a session has. A rehearsal here, on tiny models:
#   DEVICE=cpu OUT=/tmp/rehearsal bash scripts/gpu_check.sh --tiny --compile-backend eager
#   DEVICE=cpu OUT=/tmp/rehearsal STAGE=profile bash scripts/gpu_check.sh --tiny
#   DEVICE=cpu OUT=/tmp/rehearsal STAGE=frozen bash scripts/gpu_check.sh --tiny
set -uo pipefail
OUT=${OUT:-/tmp/specdecode-gpu-check}
DEVICE=${DEVICE:-cuda}
STAGE=${STAGE:-bench}
mkdir -p "$OUT"
case "$DEVICE" in
cuda*)  # the wheels are built for the GPU machine's Python
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi ;;
esac
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/log.txt"
case "$STAGE" in
bench)
    timeout "${CHECK_SECONDS:-560}" python3 -m specdecode.bench.synthetic --device "$DEVICE" \
        --out "$OUT" --dtypes bfloat16,float32 --full-dtypes bfloat16 -k 4 --prompts 4 \
        --prompt-tokens 128 --max-new-tokens 128 \
        --modes hf-plain,plain,plain-per-token,draft,draft-per-token,hf-assisted "$@" 2>&1 | tee -a "$OUT/log.txt" ;;
frozen)  # the fused projections of inductor's freezing, beside the plain compiled loop
    timeout "${CHECK_SECONDS:-560}" python3 -m specdecode.bench.synthetic --device "$DEVICE" \
        --out "$OUT" --dtypes bfloat16,float32 --full-dtypes bfloat16,float32 --prompts 4 \
        --prompt-tokens 128 --max-new-tokens 128 --modes hf-plain,plain,plain-frozen "$@" \
        2>&1 | tee -a "$OUT/log.txt" ;;
profile)
    TINY=; case " $* " in *" --tiny "*) TINY=--tiny ;; esac
    timeout "${PROFILE_SECONDS:-140}" python3 -m specdecode.bench.step_profile --device "$DEVICE" \
        --out "$OUT" --sizes 1,5 $TINY 2>&1 | tee -a "$OUT/log.txt" ;;
*)
    echo "STAGE must be bench, frozen or profile, got '$STAGE'" >&2
    exit 2 ;;
esac
