#!/usr/bin/env bash
# One prepared accelerator check for issue 3 (ragged_dot speed, MoE layer ratios and train-step MFU
# on a GPU), sized to fit one call of a few minutes. Nothing here runs in CI or `make test`.
#
# The GPU image we are lent has jax/jaxlib (CUDA), flax, optax, orbax, einops, torch and
# transformers but not ml_collections or tensorboardX; carry them as wheels. Once, here, in the
# repository root (`.whl/` is git-ignored):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform any -d .whl ml_collections tensorboardX
#
# Then run it there with `.whl` carried, writing its logs under $OUT:
#
#   bash scripts/device_check.sh            # or: QUICK=1 bash scripts/device_check.sh
#
# Each step is bounded by `timeout`, so one slow row cannot eat the whole lease; the logs say
# which step ran out. Results go to docs/benchmarks.md with this command beside them.
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.txt and stdout
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee "$OUT/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  echo "=== $name rc=${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())'"

# 1. MoE layer on the GPU, bf16: each grouped-matmul strategy against a dense MLP of the same
#    active FLOPs, fine (64e top-6) vs coarse (8e top-2). DeepSeek-V2-Lite-like width.
if [ -n "${QUICK:-}" ]; then MOE="--tokens 8192 --hidden 1024 --active 768"; else
  MOE="--tokens 32768 --hidden 2048 --active 1536"; fi
step moe_bf16 240 $PY scripts/bench_moe.py $MOE --dtype bfloat16 --iters 10 --slow-iters 10 \
    --strategies ragged_dot,padded_einsum,capacity,block_loop --blocks 128 --loop-blocks 128

# 2. Whole train step, bench_dsv2_tiny's architecture at a GPU-sized batch, bf16 compute, ds_jax
#    (ragged_dot, the non-CPU default) beside transformers' DeepseekV2ForCausalLM on CUDA.
step train_bf16 240 $PY scripts/bench_train.py --platform gpu --dtype bfloat16 --steps 10 \
    --config.batch_size=32 --config.seq_len=1024

echo "logs in $OUT"
