#!/usr/bin/env bash
# Fill .device/wheels/ on the dev machine for scripts/gpu_check.sh on a GPU machine with no network.
#
#   scripts/gpu_prepare.sh [--wheels-from DIR] [--dest DIR]
#
# Copies the wheels samsr needs beyond the GPU machine's own packages (hydra-core, omegaconf,
# antlr4, segment-anything; by default from ../shared/wheels, see its README.md) and downloads
# pytest with its dependencies (pure-Python wheels, any Python >= 3.10) from PyPI. Then carry
# .device (git-ignored) with the run, e.g. the device tool's carry: [".device"].
# Environment: PYTHON (default: .venv/bin/python if present, else python3) runs pip.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/../shared/wheels"
dest="$root/.device/wheels"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels-from) src="$2"; shift 2 ;;
        --dest) dest="$2"; shift 2 ;;
        -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "gpu_prepare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

shopt -s nullglob
wheels=("$src"/*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "gpu_prepare.sh: no wheels in $src (pass --wheels-from DIR: hydra-core, omegaconf," \
        "antlr4-python3-runtime and segment-anything wheels)" >&2
    exit 1
fi
mkdir -p "$dest"
cp -f "${wheels[@]}" "$dest/"
echo "copied ${#wheels[@]} wheels from $src"

# pytest and its dependencies, as pure-Python wheels whatever this Python is (the GPU machine's
# version is not known here): exceptiongroup and tomli are needed by Python 3.10 only.
"$python" -m pip download --quiet --only-binary=:all: --dest "$dest" \
    pytest iniconfig pluggy packaging pygments
"$python" -m pip download --quiet --only-binary=:all: --dest "$dest" \
    --python-version 3.10 --implementation py --abi none --platform any \
    exceptiongroup tomli typing-extensions
echo "wheels in $dest:"
ls -1 "$dest"
