#!/usr/bin/env bash
# The pack under ComfyUI's real model management on a GPU, in one short call of a machine that has no network:
# tests/test_lowvram.py's GPU test (what --lowvram does there: fp16 weights, most layers left on the CPU and cast to
# the GPU on the fly, against the same layers loaded whole and against plain torch layers; tiny random model), and
# FlashVSR's compiled FlexAttention against the gather attention (tiny random model, fp32 and bf16).
#
# 1. Where there is a network (this checkout's root), once:
#        bench/gpu_comfyui_check.sh prepare /path/to/ComfyUI
#    copies ComfyUI's Python source (no models, no virtual environment, about 16 MB) to .comfy/ and puts the
#    test-only packages the GPU machine lacks (diffusers, to write the tiny model, and what it needs) as wheels
#    for CPython 3.12 in .whl-test/ (both ignored by git). ComfyUI's model management needs torch, psutil,
#    einops, safetensors, tqdm, numpy, pillow and torchvision, which such machines hold.
# 2. On the GPU machine, from the checkout's root, with .comfy and .whl-test beside it:
#        bench/gpu_comfyui_check.sh run [OUT_DIR]
#    writes the test's output to OUT_DIR/comfyui_gpu.log (default: $OUT, else bench/results). About a minute.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
python=${PYTHON:-python3}
. bench/carry_size.sh

prepare() {
    local comfy=${1:?give the path of a ComfyUI checkout}
    [ -f "$comfy/comfy/model_management.py" ] || { echo "$comfy is not a ComfyUI checkout"; exit 2; }
    rm -rf .comfy .whl-test
    mkdir -p .comfy .whl-test
    # (anchored: comfy/ldm/models and comfy_api/input are ComfyUI's code, not its data folders)
    (cd "$comfy" && tar cf - --exclude=./.git --exclude=./.venv --exclude=./models --exclude=./input \
        --exclude=./output --exclude=./custom_nodes --exclude=__pycache__ --exclude=./tests --exclude=./tests-unit .) \
        | (cd .comfy && tar xf -)
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl-test diffusers==0.42.1 \
        importlib_metadata==8.5.0
    du -sh .comfy .whl-test
    check_carry_size
}

run() {
    local out=${1:-${OUT:-bench/results}}
    mkdir -p "$out"
    [ -d .comfy/comfy ] && ls .whl-test/*.whl >/dev/null || { echo "run 'prepare' first (see the header)"; exit 2; }
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target /tmp/streamvsr_test_site \
        .whl-test/*.whl
    "$python" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name())"
    PYTHONPATH=/tmp/streamvsr_test_site STREAMVSR_COMFYUI="$here/.comfy" PYTHONUNBUFFERED=1 \
        "$python" -m pytest -q -rs -p no:cacheprovider -o log_cli=true --log-cli-level=INFO \
        tests/test_lowvram.py::test_partial_loading_on_a_gpu_matches_plain_layers \
        tests/test_flashvsr_engine.py::test_compiled_flex_equals_gather_on_a_gpu 2>&1 | tee "$out/comfyui_gpu.log"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
