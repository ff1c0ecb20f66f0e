#!/usr/bin/env bash
# The GPU check of issues 20 ("gpu-step") and 21 ("gpu-run") on one GPU, in one go: versions, the CUDA tests,
# the optimizer-step benchmark, then the fine-tuning benchmark at openPangu-Embedded-1B's size.
#
# Usage, from the repository root:
#     OUT=DIR scripts/gpu_step_check.sh [STEP ...]                         on the GPU machine
#     PYTHON=.venv/bin/python scripts/gpu_step_check.sh --cpu [STEP ...]   the same steps on this CPU, tiny
#
# STEP (default, in this order): tests packing_tests gpt_fp32 gpt_bf16 finetune_1b finetune_1b_mb32
# finetune_1b_padded finetune_1b_lora finetune_1b_adamw8bit; by name only: openpangu_fp32 openpangu_bf16
# lowbit_fp32.
#   tests, packing_tests: pytest -m cuda on tests/optim, and the varlen FlashAttention path of packed_sdpa
#     against SDPA per example.
#   gpt_fp32, gpt_bf16: scripts/bench_optimizer.py, 510M parameters in 162 GPT-shaped tensors, six optimizers.
#   finetune_1b: scripts/bench_finetune.py --shape 1b (1.39B parameters, the recipes' batch of 32 sequences,
#     4 per micro-batch x 8 accumulated, bf16), dualadam, adamw_torch_fused and dualadam_8bit with packing on;
#     finetune_1b_mb32: dualadam with the same 32 sequences in one micro-batch (how much of the MFU gap is
#     micro-batch size and kernel launches); finetune_1b_padded: dualadam with packing off; finetune_1b_lora:
#     dualadam with --use_peft true; finetune_1b_adamw8bit: adamw_torch_8bit (torchao's, whose first step
#     compiles a graph per tensor shape: last, on its own).
#   The first fine-tuning step that runs writes the checkpoint (2.8 GB at 1b) and the data, the later ones
#   reuse them (bench_finetune.py --reuse).
#   openpangu_fp32, openpangu_bf16: the optimizer-step benchmark on openPangu-Embedded-1B's 341 tensors;
#     lowbit_fp32: the 8- and 4-bit optimizers at 510M.
# Each benchmark step writes its JSON report to $OUT, named after the card (h200_gpt510m_fp32.json, ...,
# h200_finetune1b.json); the whole output goes to $OUT/gpu_step_check.log, the fine-tuning runs' own logs
# included. Wheels in .whl/ are installed into /tmp/site first. docs/gpu/README.md has the device call,
# the wheels, the time each step is expected to take and what each file holds.
#
# Each step has its own timeout, and all share a budget of BUDGET_S seconds (default 450), so that the
# whole run ends inside one device call of 480 s; a step is started only while the budget left covers
# the time it is expected to take (else skipped, with a line), and a step that runs into the end of the
# budget is stopped there (a fine-tuning step keeps the runs it finished). A failed step does not stop the
# others; the exit status is 1 when any failed or was skipped, 2 on a usage error. At most 7 reports per
# call, as 8 files come back from a device call. By the estimates the default steps do not all fit the
# budget: the last ones are skipped unless the earlier ones take less (docs/gpu/README.md).
#
# --cpu runs on the CPU at --params 2e5, 2 rounds of 1 step, the fine-tuning steps at the tiny shape, OUT
# defaulting to a new temporary folder; nvidia-smi, the wheels and the openpangu steps (1.39B parameters)
# are skipped there, each with a line.

set -u

cpu=false
if [[ "${1:-}" == "--cpu" ]]; then
    cpu=true
    shift
fi
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
DEFAULT_STEPS=(tests packing_tests gpt_fp32 gpt_bf16 finetune_1b finetune_1b_mb32 finetune_1b_padded
               finetune_1b_lora finetune_1b_adamw8bit)
ALL_STEPS=("${DEFAULT_STEPS[@]}" openpangu_fp32 openpangu_bf16 lowbit_fp32)
STEPS=("$@")
if (( ${#STEPS[@]} == 0 )); then
    STEPS=("${DEFAULT_STEPS[@]}")
fi
reports=0
for step in "${STEPS[@]}"; do
    if [[ " ${ALL_STEPS[*]} " != *" $step "* ]]; then
        echo "error: unknown step '$step'; known: ${ALL_STEPS[*]}" >&2
        exit 2
    fi
    [[ $step == tests || $step == packing_tests ]] || reports=$((reports + 1))
done
if (( reports > 7 )); then
    echo "error: $reports steps write a report each; 8 files come back from a device call, the log one of them: name at most 7" >&2
    exit 2
fi
if [[ -z "${OUT:-}" ]]; then
    if ! $cpu; then
        echo "error: OUT is not set: name the folder the reports and the log go to" >&2
        exit 2
    fi
    OUT=$(mktemp -d -t gpu_step_check.XXXXXX)
fi
mkdir -p "$OUT" || exit 2
# the fine-tuning steps' files: INPUTS, the checkpoint and the data that the first of them writes and the others
# reuse, and a step's run logs; removed at the start (a killed call's) and at the end
WORK=${TMPDIR:-/tmp}/gpu_step_check.work
INPUTS=$WORK/inputs

# the optimizers each bench step times (names as scripts/bench_optimizer.py --list prints them)
FULL=("AdamW fused" "AdamW foreach" "DualAdam fused, blending" "DualAdam fused, after switch"
      "DualAdam default, blending" "InvAdam fused")
LOW_BIT=("AdamW fused" "torchao AdamW8bit" "DualAdam8bit, blending" "DualAdam8bit, after switch"
         "torchao AdamW4bit" "DualAdam4bit, blending" "DualAdam4bit, after switch")

if $cpu; then
    device=cpu card=cpu gpt=gpttiny gpt_params=2e5
    timing=(--rounds 2 --steps 1)
    finetune_shape=(--shape tiny --steps 3 --train-records 96 --eval-records 8)
else
    device=cuda gpt=gpt510m gpt_params=5e8
    timing=(--rounds 5 --steps 3)
    # 8 optimizer steps of 32 sequences: one epoch of 256 records
    finetune_shape=(--shape 1b --steps 8 --train-records 256 --eval-records 32)
fi
WRITE_S=20  # writing the 1b checkpoint (2.8 GB) and the data, a guess: 15 to 30 s (docs/gpu/README.md)
# the final evaluation trimmed to a smoke test (the recipes' 977 + 1000 records and 32 x 256 generated tokens
# cost more than the steps measured); every run's command line is in its report (finetune_flags)
FINETUNE_FLAGS=(--train_eval_samples 32 --generation_eval_samples 8 --generation_max_new_tokens 32)

VERSIONS_PY='import importlib.metadata as m, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
names = ("triton", "torchao", "transformers", "huggingface_hub", "kernels", "datasets", "evaluate", "peft",
         "accelerate", "tokenizers", "safetensors", "pyarrow", "pandas", "fsspec", "numpy", "pytest")
print(*(f"{name} {version(name)}" for name in names))
pyarrow = version("pyarrow")
if pyarrow is not None and int(pyarrow.split(".")[0]) < 24:
    print(f"note: datasets 5.2 asks for pyarrow >= 24, this one is {pyarrow} (its wheel is too large to carry)")'

failed=()
deadline=$((SECONDS + BUDGET_S))

# run_step NAME EXPECTED_S TIMEOUT_S COMMAND...: run COMMAND under the smaller of its timeout and the budget
# left, if the budget left covers EXPECTED_S (at least 20 s)
run_step() {
    local name=$1 expected=$2 limit=$3
    shift 3
    local left=$((deadline - SECONDS))
    (( expected < 20 )) && expected=20
    if (( left < expected )); then
        echo "=== $name: SKIPPED, ${left} s of the budget (BUDGET_S=$BUDGET_S) left, ${expected} s expected"
        failed+=("$name (skipped, ${left} s of the budget left)")
        return
    fi
    (( limit > left )) && limit=$left
    echo "=== $name (timeout ${limit} s, expected ${expected} s):$(printf ' %q' "$@")"
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

# bench NAME EXPECTED_S TIMEOUT_S FILE_STEM BENCH_ARGS...
bench() {
    local name=$1 expected=$2 limit=$3 stem=$4
    shift 4
    run_step "$name" "$expected" "$limit" "$PYTHON" scripts/bench_optimizer.py --device "$device" "${timing[@]}" \
        --out "$OUT/${card}_${stem}.json" "$@"
}

# finetune NAME EXPECTED_S TIMEOUT_S FILE_STEM BENCH_ARGS... [-- FINETUNE_FLAGS...]: the fine-tuning benchmark,
# then every run's own log, unfiltered. EXPECTED_S and TIMEOUT_S are a step's that reuses INPUTS; the first
# step to run, or the next after one stopped before its inputs were whole, writes them, for WRITE_S more.
finetune() {
    local name=$1 expected=$2 limit=$3 stem=$4
    shift 4
    local workdir=$WORK/runs inputs=(--reuse "$INPUTS")
    if [[ ! -f $INPUTS/written.json ]]; then  # bench_finetune.py writes it once the checkpoint and data are whole
        rm -rf "$INPUTS"
        workdir=$INPUTS inputs=() expected=$((expected + WRITE_S)) limit=$((limit + 2 * WRITE_S))
    fi
    rm -rf "$WORK/runs"
    run_step "$name" "$expected" "$limit" "$PYTHON" scripts/bench_finetune.py "${finetune_shape[@]}" \
        --workdir "$workdir" "${inputs[@]}" --out "$OUT/${card}_${stem}.json" "$@"
    local log
    for log in "$workdir"/run*/log.txt; do
        [[ -f $log ]] || continue
        echo "--- $name: ${log#"$workdir"/}"
        cat "$log"
    done
    rm -rf "$WORK/runs" "$INPUTS"/run*
    rm -f "$OUT"/.*.partial  # left only by a stop in the middle of a write
}

main() {
    rm -rf "$WORK"
    trap 'rm -rf "$WORK"' EXIT
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
        run_step nvidia-smi 5 30 nvidia-smi
        card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr 'A-Z' 'a-z' |
               sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')
        card=${card:-gpu}
        if compgen -G ".whl/*.whl" >/dev/null; then
            echo "wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
            run_step wheels 20 90 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target /tmp/site .whl/*.whl
            export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        else
            skip wheels "no .whl/*.whl here"
        fi
    fi
    # the repository itself is not installed on the GPU machine; nothing there reaches the Hub, so nothing tries
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    # what the machine brings that no wheel replaces, and any requirement the mix leaves unmet (informative:
    # neither counts as a failure)
    echo "=== packages: pip show pyarrow pandas; pip check"
    timeout 60 "$PYTHON" -m pip show pyarrow pandas
    timeout 60 "$PYTHON" -m pip check
    echo "=== packages: pip check exit status $?"
    run_step versions 10 60 "$PYTHON" -c "$VERSIONS_PY"
    run_step optimizers 10 60 "$PYTHON" scripts/bench_optimizer.py --list
    for step in "${STEPS[@]}"; do
        case $step in
            tests) run_step tests 90 150 "$PYTHON" -m pytest -m cuda tests/optim -x -q ;;
            packing_tests) run_step packing_tests 20 60 "$PYTHON" -m pytest -m cuda tests/hf/test_packing_kernels.py -q ;;
            gpt_fp32) bench "$step" 25 75 "${gpt}_fp32" --params "$gpt_params" --dtype float32 --optimizers "${FULL[@]}" ;;
            gpt_bf16) bench "$step" 25 75 "${gpt}_bf16" --params "$gpt_params" --dtype bfloat16 --optimizers "${FULL[@]}" ;;
            finetune_1b)
                finetune "$step" 120 180 finetune1b --optim dualadam adamw_torch_fused dualadam_8bit --packing on -- \
                    "${FINETUNE_FLAGS[@]}"
                ;;
            finetune_1b_mb32)
                finetune "$step" 45 90 finetune1b_mb32 --optim dualadam --packing on -- "${FINETUNE_FLAGS[@]}" \
                    --per_device_train_batch_size 32 --gradient_accumulation_steps 1
                ;;
            finetune_1b_padded)
                finetune "$step" 45 90 finetune1b_padded --optim dualadam --packing off -- "${FINETUNE_FLAGS[@]}"
                ;;
            finetune_1b_lora)
                finetune "$step" 35 75 finetune1b_lora --optim dualadam --packing on -- "${FINETUNE_FLAGS[@]}" \
                    --use_peft true
                ;;
            finetune_1b_adamw8bit)
                finetune "$step" 75 135 finetune1b_adamw8bit --optim adamw_torch_8bit --packing on -- "${FINETUNE_FLAGS[@]}"
                ;;
            openpangu_fp32 | openpangu_bf16)
                if $cpu; then
                    skip "$step" "CPU trial: 1.39B parameters; tests/analysis/test_bench.py checks the shapes"
                else
                    local dtype=float32
                    [[ $step == openpangu_bf16 ]] && dtype=bfloat16
                    bench "$step" 40 100 "openpangu1b_${step#openpangu_}" --shape openpangu-1b --dtype "$dtype" \
                        --optimizers "${FULL[@]}"
                fi
                ;;
            lowbit_fp32)
                bench "$step" 120 200 "${gpt}_lowbit_fp32" --params "$gpt_params" --dtype float32 --optimizers "${LOW_BIT[@]}"
                ;;
        esac
    done
    echo "=== files in $OUT:"
    ls -l "$OUT"
    echo "=== $SECONDS s in all"
    if (( ${#failed[@]} )); then
        printf '=== NOT ALL STEPS PASSED:\n'
        printf '  %s\n' "${failed[@]}"
        return 1
    fi
    echo "=== all steps passed"
}

main 2>&1 | tee "$OUT/gpu_step_check.log"
exit "${PIPESTATUS[0]}"
