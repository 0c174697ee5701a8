#!/usr/bin/env bash
# The GPU tier on a CUDA machine without network, run at the repository root:
#
#   scripts/gpu_check.sh [--skip-install] [--no-bench]
#
# 1. Installs what is missing from the wheels in .device/wheels (made on the dev machine by
#    scripts/gpu_prepare.sh): hydra-core, omegaconf, segment-anything, pytest, then samsr itself
#    (editable, --no-deps: the machine's own torch stays). Skipped with --skip-install.
# 2. python3 -m pytest -m gpu -q (tests/test_gpu.py and the other gpu-marked tests).
# 3. A short benchmark: faithful vs fast and its GPU candidates (fast_batched, fast_untiled) on
#    synthetic 2048x1536 and 4000x3000 images with a ResNet-50 CRM (random weights, or
#    SAMSR_BENCH_CKPT: e.g. a carried quickstart_r50 checkpoint).
# Everything goes to $OUT/gpu_check.log when OUT is set (the benchmark to $OUT/benchmark), else
# to outputs/gpu_check/<date>_<time>/. No weights or data are needed.
#
# Environment (defaults in brackets):
#   PYTHON [python3]                the interpreter to test and install into
#   SAMSR_TEST_DEVICE [cuda]        device of the tests; cpu runs the tier on the CPU
#   SAMSR_BENCH_DEVICE [= SAMSR_TEST_DEVICE]
#   SAMSR_BENCH_SIZES [2048x1536 4000x3000]   e.g. 256x192 for a quick CPU try
#   SAMSR_BENCH_CKPT []             a checkpoint to benchmark instead of random weights
#   SAMSR_BENCH_BACKBONE [resnet50] the random-weights encoder
#   SAMSR_BENCH_VARIANTS [faithful fast fast_batched fast_untiled]
#   SAMSR_BENCH_TIMEOUT [300]       seconds per benchmark worker
#   SAMSR_WHEELS [.device/wheels]   SAMSR_SKIP_INSTALL=1 / SAMSR_BENCH=0: as the flags
#   PIP_ARGS []                     extra pip install flags (e.g. --user)
#   PYTEST_ARGS []                  extra pytest arguments
# Exit status: 0 all passed; 1 tests failed; 2 benchmark failed (tests passed); 3 set-up failed
# (packages missing and not installable, or the test device is CUDA and CUDA is unavailable).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [[ "$PY" == */* && "$PY" != /* ]]; then PY="$PWD/$PY"; fi  # a relative path: from here
cd "$root" || exit 3

skip_install="${SAMSR_SKIP_INSTALL:-0}"
bench="${SAMSR_BENCH:-1}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --skip-install) skip_install=1 ;;
        --no-bench) bench=0 ;;
        -h | --help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 3 ;;
    esac
    shift
done

device="${SAMSR_TEST_DEVICE:-cuda}"
bench_device="${SAMSR_BENCH_DEVICE:-$device}"
wheels="${SAMSR_WHEELS:-$root/.device/wheels}"
stamp="$(date +%Y-%m-%d_%H-%M-%S)"
if [[ -n "${OUT:-}" ]]; then
    out_dir="$OUT"
else
    out_dir="$root/outputs/gpu_check/$stamp"
fi
mkdir -p "$out_dir" || exit 3
log="$out_dir/gpu_check.log"

say() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

pip_install() {
    # shellcheck disable=SC2086  # PIP_ARGS is a list of flags
    "$PY" -m pip install --no-index --find-links "$wheels" ${PIP_ARGS:-} "$@"
}

need_wheels() {
    if ! compgen -G "$wheels/*.whl" >/dev/null; then
        say "ERROR: no wheels in $wheels. On the dev machine run scripts/gpu_prepare.sh (it copies"
        say "../shared/wheels and downloads pytest: pip download pytest iniconfig pluggy packaging"
        say "pygments -d .device/wheels) and carry .device with the run."
        return 1
    fi
}

samsr_here() {
    # samsr imports from this checkout, from outside the repository (no cwd on sys.path)
    (cd / && "$PY" -c "import pathlib, samsr, sys
sys.exit(pathlib.Path(samsr.__file__).resolve().parents[1] != pathlib.Path(sys.argv[1]))" \
        "$root") 2>/dev/null
}

setup() {
    say "repository $root, python $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)"
    if ! "$PY" -c "import torch, torchvision, numpy, cv2, PIL, tqdm, tensorboard, timm" 2>/dev/null; then
        say "ERROR: $PY lacks one of torch, torchvision, numpy, opencv, pillow, tqdm, tensorboard,"
        say "timm: the GPU machine is expected to have them (they are not carried as wheels)."
        "$PY" -c "import torch, torchvision, numpy, cv2, PIL, tqdm, tensorboard, timm"
        return 1
    fi
    if ! "$PY" -c "import hydra, omegaconf, segment_anything" 2>/dev/null; then
        [[ "$skip_install" == 1 ]] && { say "ERROR: hydra/omegaconf/segment_anything missing and --skip-install"; return 1; }
        need_wheels || return 1
        say "installing hydra-core omegaconf segment-anything from $wheels"
        pip_install hydra-core omegaconf segment-anything || return 1
    fi
    if ! "$PY" -m pytest --version >/dev/null 2>&1; then
        [[ "$skip_install" == 1 ]] && { say "ERROR: pytest missing and --skip-install"; return 1; }
        need_wheels || return 1
        if ! compgen -G "$wheels/pytest-*.whl" >/dev/null; then
            say "ERROR: pytest is not installed and not among the wheels in $wheels. On the dev"
            say "machine: scripts/gpu_prepare.sh, or pip download pytest iniconfig pluggy packaging"
            say "pygments exceptiongroup tomli -d .device/wheels; then carry .device."
            return 1
        fi
        say "installing pytest from $wheels"
        pip_install pytest || return 1
    fi
    if ! samsr_here; then
        if [[ "$skip_install" != 1 ]]; then
            say "installing samsr (editable, --no-deps)"
            # shellcheck disable=SC2086
            "$PY" -m pip install --no-index --no-deps --no-build-isolation ${PIP_ARGS:-} -e . ||
                say "WARNING: the editable install failed; using PYTHONPATH=$root instead"
        fi
        if ! samsr_here; then
            export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
            samsr_here || { say "ERROR: samsr does not import from $root"; return 1; }
        fi
    fi
    "$PY" - <<'PYEOF' || return 1
import hydra, omegaconf, pytest, segment_anything, torch, torchvision
import samsr
print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), torchvision "
      f"{torchvision.__version__}, hydra {hydra.__version__}, omegaconf {omegaconf.__version__}, "
      f"pytest {pytest.__version__}, samsr from {samsr.__file__}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
PYEOF
    command -v nvidia-smi >/dev/null && nvidia-smi
    if [[ "$device" == cuda* || "$bench_device" == cuda* ]]; then
        if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
            say "ERROR: SAMSR_TEST_DEVICE=$device / SAMSR_BENCH_DEVICE=$bench_device but torch sees"
            say "no CUDA device (the tests would only be skipped). Use SAMSR_TEST_DEVICE=cpu"
            say "SAMSR_BENCH_DEVICE=cpu to run this on the CPU."
            return 1
        fi
    fi
    return 0
}

main() {
    local t0 t rc_tests rc_bench=0
    t0=$SECONDS
    say "log: $log"
    setup || { say "FAILED: set-up (exit 3)"; return 3; }

    t=$SECONDS
    say "tests: SAMSR_TEST_DEVICE=$device $PY -m pytest -m gpu -q"
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of arguments
    SAMSR_TEST_DEVICE="$device" "$PY" -m pytest -m gpu -q -rs --durations=15 ${PYTEST_ARGS:-}
    rc_tests=$?
    say "tests: exit $rc_tests in $((SECONDS - t)) s"

    if [[ "$bench" != 0 ]]; then
        t=$SECONDS
        local sizes variants
        read -r -a sizes <<<"${SAMSR_BENCH_SIZES:-2048x1536 4000x3000}"
        read -r -a variants <<<"${SAMSR_BENCH_VARIANTS:-faithful fast fast_batched fast_untiled}"
        local weights=(--random-weights --backbone "${SAMSR_BENCH_BACKBONE:-resnet50}")
        [[ -n "${SAMSR_BENCH_CKPT:-}" ]] && weights=(--ckpt "$SAMSR_BENCH_CKPT")
        say "benchmark: ${variants[*]} at ${sizes[*]} on $bench_device (${weights[*]})"
        "$PY" scripts/benchmark.py "${weights[@]}" --sizes "${sizes[@]}" --num-images 1 \
            --variants "${variants[@]}" --device "$bench_device" --no-keep-masks \
            --timeout "${SAMSR_BENCH_TIMEOUT:-300}" --out "$out_dir/benchmark"
        rc_bench=$?
        say "benchmark: exit $rc_bench in $((SECONDS - t)) s (report: $out_dir/benchmark)"
    fi

    say "total $((SECONDS - t0)) s; tests exit $rc_tests, benchmark exit $rc_bench"
    if [[ $rc_tests -ne 0 ]]; then
        say "FAILED: tests (exit 1)"
        return 1
    fi
    if [[ $rc_bench -ne 0 ]]; then
        say "FAILED: benchmark (exit 2)"
        return 2
    fi
    say "OK"
    return 0
}

main 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
