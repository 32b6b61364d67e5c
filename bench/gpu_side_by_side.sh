#!/usr/bin/env bash
# Ours against the official Stream-DiffVSR pipeline on a GPU, in one call of a machine that has no network:
# bench/bench_vs_official.py at a 1280-wide and a 1920-wide output, fp16 on both sides, real-size architecture
# with random weights (written there), official / ours / ours in NCHW / ours compiled, interleaved (ours stores
# its networks channels-last there; nchw measures the layout it ran in before).
#
# 1. Where there is a network (this checkout's root), once:
#        bench/gpu_side_by_side.sh prepare /path/to/jamichss/Stream-DiffVSR
#    puts the official code's pinned packages as wheels for CPython 3.12 in .whl-official/ (about 15 MB) and a
#    copy of the checkout in .official/ (both ignored by git; .whl/ is left to other uses). The GPU machine is
#    expected to hold torch, torchvision, numpy, pillow, safetensors, einops, accelerate, matplotlib and the rest of
#    what both sides import.
# 2. On the GPU machine, from the checkout's root, with .whl-official and .official beside it:
#        bench/gpu_side_by_side.sh run [OUT_DIR]
#    writes every pass's tables to OUT_DIR/tables.md, a log per pass (720.log, 1080.log, 720-autotune-off.log,
#    720-bf16.log) and the profile (profile_720.tgz) to OUT_DIR (default: $OUT, else bench/results): at most seven
#    files, as a lent machine gives back eight.
#
# Sizes: the official pipeline shrinks LR sides to multiples of 4 (1080p's 270 is not one), and the first GPU
# measurements were taken at multiples of 8: "720p" is LR 184x320 -> 736x1280 and "1080p" LR 272x480 -> 1088x1920.
# Compiling at a second size would double the compile time, so the 1080p run has no compiled variant (and two
# rounds, no profile). Two short passes at 720p follow (two rounds each, ours only: the official's figures are those
# of the first pass): 720-autotune-off runs ours without cuDNN's autotuning, for what the first round and the peak
# VRAM cost with it; 720-bf16 runs ours and nchw in bf16, the precision ComfyUI picks where the GPU has it. Override with SIZES_720, SIZES_1080, SIZES_AUTOTUNE_OFF, SIZES_BF16 (HxW; empty: skip
# that pass), VARIANTS_720, VARIANTS_1080, VARIANTS_AUTOTUNE_OFF, VARIANTS_BF16, FRAMES, ROUNDS, DEVICE, DTYPE,
# COMPILE_MODE, CUDNN_BENCHMARK (ours / both / none), BREAKDOWN (bench_vs_official --breakdown on the two sizes)
# and PROFILE (--profile on the 720 pass, packed as OUT_DIR/profile_720.tgz; both on unless set empty), WORKDIR (a
# bench_vs_official --workdir: a random model already there is reused), DEADLINE (seconds: a pass still running
# then is stopped and prints what it measured; a pass with less time left than it needs to start, 150 s for the
# two main passes and 90 s for the short ones, is skipped). On the H200 lent on 2026-12-04 the first two passes,
# before the nchw variant and the profile joined them, took about 6 minutes (the compiling about 2.5 of them); all
# four are estimated at 10-11 minutes, more than one device call may take. The device tool copies only files git
# does not ignore: name .whl-official and .official (and for the ComfyUI check .comfy and .whl-test) in its
# `carry`. With 15 minutes of device time in all, the machine's start (1-2 minutes) included, and a machine that
# goes back after seconds of idling, both checks go in one call of at most 590 s, the short one first:
#     timeout 150 bench/gpu_comfyui_check.sh run $OUT; DEADLINE=$((560 - SECONDS)) SIZES_AUTOTUNE_OFF= \
#         SIZES_BF16= bench/gpu_side_by_side.sh run $OUT
# The two short passes (SIZES_720= SIZES_1080= with DEADLINE) are worth a call only on the still-warm machine
# with several minutes left. Each worker hands its cached GPU memory back after every answer, so the variants,
# interleaved in processes of their own, fit an 80 GB GPU (cuDNN's autotuning peaks near 30 GB per variant).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
python=${PYTHON:-python3}
. bench/carry_size.sh

prepare() {
    local checkout=${1:?give the path of a jamichss/Stream-DiffVSR checkout}
    [ -f "$checkout/pipeline/stream_diffvsr_pipeline.py" ] || { echo "$checkout is not a Stream-DiffVSR checkout"; exit 2; }
    rm -rf .official .whl-official
    mkdir -p .official .whl-official
    # (the code only: a virtual environment or caches there would not fit what a device call carries)
    mkdir -p .official/Stream-DiffVSR
    (cd "$checkout" && tar cf - --exclude=./.git --exclude=./.venv --exclude=./venv --exclude=__pycache__ .) \
        | (cd .official/Stream-DiffVSR && tar xf -)
    # The official code's pins (diffusers 0.27.2 needs a huggingface_hub from before 0.26, and transformers 4.37.2
    # a tokenizers before 0.19); the GPU machine's newer versions of these stay untouched, see run().
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl-official diffusers==0.27.2 transformers==4.37.2 tokenizers==0.15.2 huggingface_hub==0.25.2 \
        importlib_metadata==8.5.0
    du -sh .whl-official .official
    check_carry_size
}

worker_logs() {  # the end of each worker's log, appended to the driver's (few files come back from a lent machine)
    for log in "$1"/*.log; do
        [ -f "$log" ] && { echo "==> ${log##*/}"; tail -n 40 "$log"; rm -f "$log"; }
    done
    return 0
}

run() {
    local out=${1:-${OUT:-bench/results}}
    out=$(realpath -m "$out")  # the workers run elsewhere: a relative path would lose the profile
    local work=${WORKDIR:-/tmp/streamvsr_gpu_bench}
    local start=$SECONDS
    mkdir -p "$out" "$work"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network there: nothing may wait for one
    # name | size | variants | what else: the two sizes with the breakdown (720 also with the profile), then
    # (shorter: no breakdown, no profile, two rounds) what the first round costs without cuDNN's autotuning, and
    # bf16, the precision ComfyUI picks on GPUs that have it
    local passes=("720|${SIZES_720-184x320}|${VARIANTS_720:-official,ours,nchw,compiled}|profile"
                  "1080|${SIZES_1080-272x480}|${VARIANTS_1080:-official,ours,nchw}|parts"
                  "720-autotune-off|${SIZES_AUTOTUNE_OFF-184x320}|${VARIANTS_AUTOTUNE_OFF:-ours}|off"
                  "720-bf16|${SIZES_BF16-184x320}|${VARIANTS_BF16:-ours,nchw}|bf16")
    local official=0 pass name size variants extra
    for pass in "${passes[@]}"; do
        IFS='|' read -r name size variants extra <<< "$pass"
        if [ -n "$size" ] && [[ ",$variants," == *,official,* ]]; then official=1; fi
    done
    "$python" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "|",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
EOF
    local common=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-fp16}" --frames "${FRAMES:-4}" --rounds "${ROUNDS:-3}"
                  --workdir "$work")
    if [ "$official" = 1 ]; then
        [ -d .official/Stream-DiffVSR ] && ls .whl-official/*.whl >/dev/null \
            || { echo "run 'prepare' first (see the header)"; exit 2; }
        # The official side gets its pinned packages first on its path; ours runs on the machine's own packages.
        # (wheels for CPython 3.12: another Python fails here, before any pass, and says so)
        "$python" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$work/official_site" \
            .whl-official/*.whl || { echo "the official side's wheels do not install on this Python (prepare"\
            "fetched them for CPython 3.12); run again with VARIANTS_720=ours,nchw,compiled VARIANTS_1080=ours,nchw"
            exit 2; }
        cat > "$work/official_python" <<EOF
#!/bin/sh
PYTHONPATH="$work/official_site\${PYTHONPATH:+:\$PYTHONPATH}" exec "$(command -v "$python")" "\$@"
EOF
        chmod +x "$work/official_python"
        "$work/official_python" -c "import diffusers, transformers; print('official side: diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
        common+=(--official .official/Stream-DiffVSR --official-python "$work/official_python")
    fi
    [ -n "${COMPILE_MODE:-}" ] && common+=(--compile-mode "$COMPILE_MODE")
    [ -n "${CUDNN_BENCHMARK:-}" ] && common+=(--cudnn-benchmark "$CUDNN_BENCHMARK")
    local status=0 limit need
    : > "$out/tables.md"
    for pass in "${passes[@]}"; do
        IFS='|' read -r name size variants extra <<< "$pass"
        [ -n "$size" ] || continue  # an empty SIZES_* skips that pass
        local args=("${common[@]}") stop=()
        if [ "$extra" = off ]; then
            args+=(--cudnn-benchmark none --rounds 2)
        elif [ "$extra" = bf16 ]; then
            args+=(--dtype bf16 --rounds 2)
        else
            [ -n "${BREAKDOWN-1}" ] && args+=(--breakdown)
            if [ "$extra" = profile ]; then
                [ -n "${PROFILE-1}" ] && args+=(--profile "$out/profile_$name")
            else
                args+=(--rounds 2)
            fi
        fi
        if [ -n "${DEADLINE:-}" ]; then
            limit=$((DEADLINE - (SECONDS - start)))
            need=150
            case "$extra" in off|bf16) need=90 ;; esac  # (the workers' start alone takes most of a minute)
            if [ "$limit" -lt "$need" ]; then
                echo "pass $name skipped: ${limit} s left of DEADLINE=$DEADLINE"
                continue
            fi
            stop=(timeout --preserve-status -s TERM "$limit")  # the driver then prints what it measured
        fi
        # one file of tables for every pass: only so many files come back from a lent machine
        echo "## pass $name" | tee -a "$out/tables.md"
        PYTHONUNBUFFERED=1 ${stop[@]+"${stop[@]}"} "$python" bench/bench_vs_official.py "${args[@]}" --size "$size" \
            --variants "$variants" 2> "$out/$name.log" | tee -a "$out/tables.md" || status=$?
        worker_logs "$work" >> "$out/$name.log"
        if [ -d "$out/profile_$name" ]; then  # one file: only so many come back from a lent machine
            tar -C "$out" -czf "$out/profile_$name.tgz" "profile_$name" && rm -rf "$out/profile_$name"
        fi
    done
    return $status
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
