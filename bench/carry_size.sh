# Sourced by gpu_side_by_side.sh and gpu_comfyui_check.sh: the one device call that runs both carries their
# prepared folders together, and a call carries at most 64 MiB (the tracked files, about 2 MiB, included).
check_carry_size() {
    local paths=() p mib
    for p in .whl-official .official .comfy .whl-test; do
        [ -e "$p" ] && paths+=("$p")
    done
    [ "${#paths[@]}" -gt 0 ] || return 0
    mib=$(du -scm "${paths[@]}" | tail -n 1 | cut -f1)
    echo "to carry: ${paths[*]}, ${mib} MiB together"
    if [ "$mib" -gt 60 ]; then
        echo "a device call carries 64 MiB in all: copy checkouts without weights, virtual environments or data"
        exit 2
    fi
}
