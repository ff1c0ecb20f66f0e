#!/usr/bin/env bash
# Issue 20 ("gpu-step") on one GPU, in one go: versions, the CUDA tests, then the optimizer-step benchmark.
#
# Usage, from the repository root:
#     OUT=DIR scripts/gpu_step_check.sh [STEP ...]                         on the GPU machine
#     PYTHON=.venv/bin/python scripts/gpu_step_check.sh --cpu [STEP ...]   the same steps on this CPU, tiny
#
# STEP (default: all, in this order): tests packing_tests gpt_fp32 gpt_bf16 openpangu_fp32 openpangu_bf16
# lowbit_fp32 (packing_tests: the varlen FlashAttention path of packed_sdpa against SDPA per example).
# The gpt steps bench 510M parameters in 162 GPT-shaped tensors, the openpangu steps openPangu-Embedded-1B's
# 341 tensors (1.39B parameters), lowbit_fp32 the 8- and 4-bit optimizers at 510M. Each bench step writes
# its JSON report to $OUT, named after the card (h200_gpt510m_fp32.json, h200_gpt510m_bf16.json,
# h200_openpangu1b_fp32.json, h200_openpangu1b_bf16.json, h200_gpt510m_lowbit_fp32.json); the whole output
# goes to $OUT/gpu_step_check.log. Wheels in .whl/ (torchao, for the low-bit optimizers) are installed into
# /tmp/site first. docs/gpu/README.md has the device call, the wheels and what each file holds.
#
# Each step has its own timeout, and all share a budget of BUDGET_S seconds (default 420), so that the
# whole run ends inside one device call with time left to rerun a step; a step the budget no longer
# covers is skipped. A failed step does not stop the others; the exit status is 1 when any failed or was
# skipped, 2 on a usage error.
#
# --cpu runs on the CPU at --params 2e5, 2 rounds of 1 step, OUT defaulting to a new temporary folder;
# nvidia-smi, the wheels and the openpangu steps (1.39B parameters) are skipped there, each with a line.

set -u

cpu=false
if [[ "${1:-}" == "--cpu" ]]; then
    cpu=true
    shift
fi
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-420}
ALL_STEPS=(tests packing_tests gpt_fp32 gpt_bf16 openpangu_fp32 openpangu_bf16 lowbit_fp32)
STEPS=("$@")
if (( ${#STEPS[@]} == 0 )); then
    STEPS=("${ALL_STEPS[@]}")
fi
for step in "${STEPS[@]}"; do
    if [[ " ${ALL_STEPS[*]} " != *" $step "* ]]; then
        echo "error: unknown step '$step'; known: ${ALL_STEPS[*]}" >&2
        exit 2
    fi
done
if [[ -z "${OUT:-}" ]]; then
    if ! $cpu; then
        echo "error: OUT is not set: name the folder the reports and the log go to" >&2
        exit 2
    fi
    OUT=$(mktemp -d -t gpu_step_check.XXXXXX)
fi
mkdir -p "$OUT" || exit 2

# the optimizers each bench step times (names as scripts/bench_optimizer.py --list prints them)
FULL=("AdamW fused" "AdamW foreach" "DualAdam fused, blending" "DualAdam fused, after switch"
      "DualAdam default, blending" "InvAdam fused")
LOW_BIT=("AdamW fused" "torchao AdamW8bit" "DualAdam8bit, blending" "DualAdam8bit, after switch"
         "torchao AdamW4bit" "DualAdam4bit, blending" "DualAdam4bit, after switch")

if $cpu; then
    device=cpu card=cpu gpt=gpttiny gpt_params=2e5
    timing=(--rounds 2 --steps 1)
else
    device=cuda gpt=gpt510m gpt_params=5e8
    timing=(--rounds 5 --steps 3)
fi

VERSIONS_PY='import importlib.util as u, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print(*(f"{name} {__import__(name).__version__ if u.find_spec(name) else None}"
        for name in ("triton", "torchao", "transformers", "pytest")))'

failed=()
deadline=$((SECONDS + BUDGET_S))

# run_step NAME TIMEOUT_S COMMAND...: run COMMAND under the smaller of its timeout and the budget left
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    if (( left < 20 )); then
        echo "=== $name: SKIPPED, the budget (BUDGET_S=$BUDGET_S) is spent"
        failed+=("$name (skipped, no budget left)")
        return
    fi
    (( limit > left )) && limit=$left
    echo "=== $name (timeout ${limit} s):$(printf ' %q' "$@")"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@"
    local rc=$?
    if (( rc == 0 )); then
        echo "=== $name: ok in $((SECONDS - start)) s"
    elif (( rc == 124 || rc == 137 )); then
        echo "=== $name: TIMED OUT after ${limit} s"
        failed+=("$name (timed out after ${limit} s)")
    else
        echo "=== $name: FAILED with exit status $rc after $((SECONDS - start)) s"
        failed+=("$name (exit status $rc)")
    fi
}

skip() {
    echo "=== $1: skipped, $2"
}

# bench NAME TIMEOUT_S FILE_STEM BENCH_ARGS...
bench() {
    local name=$1 limit=$2 stem=$3
    shift 3
    run_step "$name" "$limit" "$PYTHON" scripts/bench_optimizer.py --device "$device" "${timing[@]}" \
        --out "$OUT/${card}_${stem}.json" "$@"
}

main() {
    echo "gpu_step_check: steps ${STEPS[*]}; budget ${BUDGET_S} s; reports in $OUT; $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    # the copy on the GPU machine may come without git metadata: the digest names the code measured either way
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no git metadata here)')"
    git status --short 2>/dev/null | sed 's/^/  changed: /'
    echo "source digest: $(find dualadam_hf scripts -name '*.py' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum |
        sha256sum | cut -c1-16)"
    if $cpu; then
        skip nvidia-smi "CPU trial"
        skip wheels "CPU trial: $PYTHON's own packages"
    else
        run_step nvidia-smi 30 nvidia-smi
        card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr 'A-Z' 'a-z' |
               sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')
        card=${card:-gpu}
        if compgen -G ".whl/*.whl" >/dev/null; then
            run_step wheels 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target /tmp/site .whl/*.whl
            export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        else
            skip wheels "no .whl/*.whl here"
        fi
    fi
    # the repository itself is not installed on the GPU machine
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    run_step versions 60 "$PYTHON" -c "$VERSIONS_PY"
    run_step optimizers 60 "$PYTHON" scripts/bench_optimizer.py --list
    for step in "${STEPS[@]}"; do
        case $step in
            tests) run_step tests 150 "$PYTHON" -m pytest -m cuda tests/optim -x -q ;;
            packing_tests) run_step packing_tests 60 "$PYTHON" -m pytest -m cuda tests/hf/test_packing_kernels.py -q ;;
            gpt_fp32) bench "$step" 100 "${gpt}_fp32" --params "$gpt_params" --dtype float32 --optimizers "${FULL[@]}" ;;
            gpt_bf16) bench "$step" 100 "${gpt}_bf16" --params "$gpt_params" --dtype bfloat16 --optimizers "${FULL[@]}" ;;
            openpangu_fp32 | openpangu_bf16)
                if $cpu; then
                    skip "$step" "CPU trial: 1.39B parameters; tests/analysis/test_bench.py checks the shapes"
                else
                    local dtype=float32
                    [[ $step == openpangu_bf16 ]] && dtype=bfloat16
                    bench "$step" 120 "openpangu1b_${step#openpangu_}" --shape openpangu-1b --dtype "$dtype" \
                        --optimizers "${FULL[@]}"
                fi
                ;;
            lowbit_fp32)
                bench "$step" 240 "${gpt}_lowbit_fp32" --params "$gpt_params" --dtype float32 --optimizers "${LOW_BIT[@]}"
                ;;
        esac
    done
    echo "=== files in $OUT:"
    ls -l "$OUT"
    if (( ${#failed[@]} )); then
        printf '=== NOT ALL STEPS PASSED:\n'
        printf '  %s\n' "${failed[@]}"
        return 1
    fi
    echo "=== all steps passed"
}

main 2>&1 | tee "$OUT/gpu_step_check.log"
exit "${PIPESTATUS[0]}"
