#!/usr/bin/env bash
# Everything a lent GPU is for, in one command: the CUDA tests, the HF rollout's engines (generate, compiled,
# CUDA graphs) at three batch sizes, one RL step per trainer feature, the kernel benchmarks at real shapes. Run from
# the repository root; results go to $OUT (default gpu_out/).
#
#   STAGES="tests rollout" bash bench/gpu_session.sh       # first call: ~2 + 3.5 min on an H200
#   STAGES=rl T_RL=400 RL_BUDGET=330 RL_ARGS="--variants base,compiled_rollout,cuda_graphs" bash bench/gpu_session.sh
#                                                           # each compiled variant compiles in its fresh process
#   STAGES="rl bench" BENCH_KERNELS=fused_linear_degrpo_loss BENCH_K="full" bash bench/gpu_session.sh
#   STAGES=bench bash bench/gpu_session.sh                  # one pytest + JSON per kernel
#
# One call runs at most 10 minutes: the stages together (tests 111 s, rl 161 s, the whole CUDA suite more than
# 200 s on 2026-11-26; rollout 204 s on 2026-11-30) do not fit one; split them as above.
#
# The package is used from the source tree (PYTHONPATH), so nothing is built: the native extension is a CPU
# backend. THINKLESS_DATA points the trainer's tests at the math problems when ../shared/data is not beside the
# checkout. Each stage has a time limit (T_TESTS, T_RL, T_BENCH seconds) so that one hang cannot eat a short lease.
set -u
OUT=${OUT:-gpu_out}
STAGES=${STAGES:-"tests rollout rl bench"}
BENCH_KERNELS=${BENCH_KERNELS:-"group_advantages degrpo_loss token_logprobs fused_linear_degrpo_loss"}
BENCH_K=${BENCH_K:-}  # an extra -k filter inside each kernel, e.g. "full and N16384"
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
# The CLI's tests call `thinkless-train`; from a source tree it is this shim.
if ! command -v thinkless-train >/dev/null; then
    mkdir -p /tmp/thinkless-bin
    printf '#!/bin/sh\nexec %s -m thinkless.cli "$@"\n' "$(command -v $PY)" > /tmp/thinkless-bin/thinkless-train
    chmod +x /tmp/thinkless-bin/thinkless-train
    export PATH=/tmp/thinkless-bin:$PATH
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())"
    $PY -m pip list 2>/dev/null | grep -iE "^(liger|datasets|pyarrow|fsspec|flash|vllm|math)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for stage in $STAGES; do
    start=$(date +%s)
    case $stage in
    tests)
        # test_distributed needs two ranks (gloo on CPU; one GPU cannot hold two NCCL ranks); test_compile and
        # test_native are CPU-side checks the CI machine already runs.
        # TESTS (files) and TESTS_K (a -k filter) narrow it, e.g. TESTS="tests/test_cuda.py tests/test_decode.py".
        timeout "${T_TESTS:-150}" $PY -m pytest ${TESTS:-tests} -q -n "${XDIST:-8}" -p no:cacheprovider \
            --ignore=tests/test_distributed.py --ignore=tests/test_compile.py --ignore=tests/test_native.py \
            ${TESTS_K:+-k "$TESTS_K"} > "$OUT/tests.log" 2>&1
        echo "== tests: exit $? in $(($(date +%s) - start)) s"
        grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -30
        ;;
    rollout)
        # Tokens/s of generate, rollout.compile and rollout.cuda_graphs at 64, 128, 256 samples x 256 tokens; the
        # rows also say whether the graph drew the compiled step's tokens and log-probs and was captured
        # (bench/rollout_gpu.py). Exit 1: it did not.
        timeout "${T_ROLLOUT:-300}" $PY bench/rollout_gpu.py --out /tmp/rollout --budget-s "${ROLLOUT_BUDGET:-200}" \
            ${ROLLOUT_ARGS:-} > /tmp/rollout.log 2>&1
        echo "== rollout: exit $? in $(($(date +%s) - start)) s"
        cp /tmp/rollout/rollout.json /tmp/rollout.log "$OUT/" 2>/dev/null
        tail -14 /tmp/rollout.log
        ;;
    rl)
        # rl_step.json holds every row, failures with their last log lines; the full logs stay in /tmp/rl_step.
        timeout "${T_RL:-170}" $PY bench/rl_step.py --out /tmp/rl_step --budget-s "${RL_BUDGET:-120}" ${RL_ARGS:-} \
            > /tmp/rl_step.log 2>&1
        echo "== rl step: exit $? in $(($(date +%s) - start)) s"
        cp /tmp/rl_step/rl_step.json "$OUT/" 2>/dev/null
        tail -12 /tmp/rl_step.log
        ;;
    bench)
        # One pytest run (and JSON) per kernel: a limit reached in one loses only that one's numbers. The test ids
        # read "[kernel-", so "[degrpo_loss-" does not also pick the fused loss.
        for kernel in $BENCH_KERNELS; do
            kstart=$(date +%s)
            timeout "${T_BENCH:-200}" $PY -m pytest bench/ -q -rf --tb=short -p no:cacheprovider \
                -k "cuda and [${kernel}-${BENCH_K:+ and ($BENCH_K)}" --benchmark-json="$OUT/gpu-$kernel.json" \
                >> "$OUT/bench.log" 2>&1
            echo "== bench $kernel: exit $? in $(($(date +%s) - kstart)) s"
        done
        grep -E "^(FAILED|ERROR)|same-run ratios|^(group_advantages|degrpo_loss|token_logprobs|fused_linear)" \
            "$OUT/bench.log" | cut -c1-230
        ;;
    esac
done
