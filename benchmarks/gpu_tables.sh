#!/usr/bin/env bash
# The GPU sections of docs/benchmarks.md, on a CUDA machine, in the order of what they decide: the CUDA tests,
# one model's pipelines and a complete `regsweep train` (gpu.py), the stacked step's settings, whole sweeps and
# where a sweep's time goes. Each part is bounded in time and its output kept in LOGS/<part>.log.
#
#     bash benchmarks/gpu_tables.sh                        # every part, logs in gpu-logs/ (about 12 minutes)
#     bash benchmarks/gpu_tables.sh tests train throughput sweeps   # what the targets need (at most 8.5 minutes)
#     LOGS=/elsewhere PYTHON=/opt/venv/bin/python bash benchmarks/gpu_tables.sh sweeps
#
# Parts and their limits (s): tests 80 (the CUDA tests; CI runs the others), gpu 200 (train 130 of it: the
# complete `regsweep train` without the pipelines' rows), throughput 90, sweeps 210, phases 200, trainphases 70
# (where the complete train's time goes; not in the default list, as phases covers the sweep). A part that
# runs out of time leaves its log so far; one that ignores the time's SIGTERM (regsweep's stop ends its runs
# first) is killed 10 s later.
# The benchmarks print first how many library modules have no compiled bytecode: compiling them is part of
# every fresh process's start-up (benchmarks/bytecode.py), so install packages the usual way, compiled.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The benchmarks run `python -m regsweep` from temporary folders: this checkout's package, installed or not.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
logs=${LOGS:-gpu-logs}
py=${PYTHON:-python3}  # the interpreter that has torch with CUDA
mkdir -p "$logs"

part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

run_part() {
    case $1 in
        tests) part tests 80 "$py" -m pytest -q -rs tests/test_gpu.py tests/test_stack.py \
            -k "cuda or captured or same_gpu" ;;
        gpu) part gpu 200 "$py" benchmarks/gpu.py --rounds 1 ;;
        train) part train 130 "$py" benchmarks/gpu.py --rounds 1 --skip-pipelines ;;
        throughput) part throughput 90 "$py" benchmarks/stack.py --throughput 32 \
            --variants default,channels-last,bf16,channels-last-bf16 --profile 20 ;;
        sweeps) part sweeps 210 "$py" benchmarks/stack.py --rows 32,grid ;;
        phases) part phases 200 "$py" benchmarks/phases.py optimize --trials 32 --epochs 15 --stack 32 ;;
        trainphases) part trainphases 70 "$py" benchmarks/phases.py train --epochs 15 --device cuda ;;
        *) echo "unknown part $1 (tests, gpu, train, throughput, sweeps, phases, trainphases)" >&2; return 2 ;;
    esac
}

"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device: nothing to measure"; exit 0; }
parts=("$@")
[ $# -gt 0 ] || parts=(tests gpu throughput sweeps phases)
for name in "${parts[@]}"; do run_part "$name"; done
