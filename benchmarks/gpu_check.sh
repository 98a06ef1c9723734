#!/usr/bin/env bash
# What only a GPU can check, in one command for a machine lent for minutes: the self-test of every backend against
# the reference on the GPU, the GPU tests (the CUDA extension's, the Triton kernels' compiled, the conformance suite
# on CUDA tensors), the ops' measured times next to the GPU-blind estimate (bench_ops.py --device cuda), which is
# what calibrates rwp_kernels.gpu_model, and the Triton kernel variants the GPU-blind analysis left open, timed side
# by side (bench_variants.py: its verdicts say which to ship). From the clone's root, with the Python that holds a
# CUDA PyTorch (and Triton; nvcc for the CUDA extension); nothing is installed, the checkout is imported as it is:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          (default: benchmarks/results/gpu_check)
#
# Stages, each with its own time limit (LIMIT, seconds) and log (OUT_DIR/<stage>.log): env, build, selftest, tests,
# bench_ops, bench_triton, bench_variants. GPU_CHECK_STAGES="selftest bench_ops" runs a subset; PYTHON picks the
# interpreter (python3). The extension is built for the GPU's architecture alone, into
# benchmarks/results/torch_extensions (a later run on the same machine reuses it). A failing stage does not stop the
# next ones; OUT_DIR/summary.txt gives each stage's exit status and seconds; the exit status is 1 if a stage failed,
# 2 without a GPU (said at once). The limits add up to 24 minutes, most of it spare (on 2 CPU cores without a GPU
# the stages take under a minute); where one command may run 10 minutes, split the stages over two. The device
# machines lent to this project return at most 8 files: pack OUT_DIR (tar) to bring it back.
set -uo pipefail
OUT=${1:-}
[[ -z $OUT || $OUT == /* ]] || OUT=$PWD/$OUT  # (relative to where it was called from)
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu_check}
STAGES=${GPU_CHECK_STAGES:-env build selftest tests bench_ops bench_triton bench_variants}
declare -A LIMIT=([env]=60 [build]=300 [selftest]=180 [tests]=300 [bench_ops]=240 [bench_triton]=120 [bench_variants]=240)
for stage in $STAGES; do
    if [[ -z "${LIMIT[$stage]:-}" ]]; then
        echo "gpu_check: unknown stage $stage (stages: env build selftest tests bench_ops bench_triton bench_variants)" >&2
        exit 2
    fi
done
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False, or no torch): nothing to check" >&2
    exit 2
fi
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/benchmarks/results/torch_extensions}
# The checkout, also for the scripts and the tests' subprocesses (the package need not be installed).
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST TORCH_EXTENSIONS_DIR PYTHONPATH PYTHONUNBUFFERED=1
mkdir -p "$OUT"

stage_env() {
    nvidia-smi -L || true
    "$PY" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__,
                                              'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
    "$PY" -c "import triton; print('triton', triton.__version__)" || true
    command -v nvcc && nvcc --version | tail -1
    "$PY" -m rwp_kernels.report
}
stage_build() { "$PY" -m rwp_kernels.build; }
stage_selftest() { "$PY" -m rwp_kernels.report --selftest; }
stage_tests() {
    # the conformance suite's cases on CUDA tensors (CI runs the CPU ones), in one process: the GPU machine
    # may lack pytest-xdist, and its workers would share the one GPU
    "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_ext_cuda.py tests/test_optim_cuda.py \
        tests/test_triton_gpu.py tests/test_conformance.py -k "not cpu"
}
stage_bench_ops() { "$PY" benchmarks/bench_ops.py --device cuda --rounds 2 --out "$OUT"; }
stage_bench_triton() { "$PY" benchmarks/bench_triton.py --out "$OUT"; }
stage_bench_variants() { "$PY" benchmarks/bench_variants.py --out "$OUT"; }

failed=0
: > "$OUT/summary.txt"
for stage in $STAGES; do
    echo "== $stage (limit ${LIMIT[$stage]} s)"
    start=$SECONDS
    timeout "${LIMIT[$stage]}" bash -c "$(declare -f "stage_$stage"); PY='$PY' OUT='$OUT' stage_$stage" 2>&1 \
        | tee "$OUT/$stage.log"
    status=${PIPESTATUS[0]}
    line="$stage: exit $status$([[ $status == 124 ]] && echo ' (time limit)') in $((SECONDS - start)) s"
    echo "$line" | tee -a "$OUT/summary.txt"
    [[ $status == 0 ]] || failed=$((failed + 1))
done
echo "gpu_check: $failed failed stage(s); logs and results in $OUT"
[[ $failed == 0 ]]
