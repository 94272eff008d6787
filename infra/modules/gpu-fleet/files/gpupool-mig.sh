#!/usr/bin/env bash
# gpupool-mig: brings every GPU of this host to one MIG layout. Run by
# gpupool-mig.service at every boot, before gpupool-server.service: MIG mode
# survives a reboot, GPU and compute instances do not.
#
#   gpupool-mig apply   enable MIG mode (rebooting once if the driver leaves it
#                       pending), destroy whatever instances exist, create the
#                       layout's GPU instances at planned placements, each with
#                       its default compute instance. Idempotent.
#   gpupool-mig plan    read layouts from stdin, one per line (profile names
#                       separated by commas); print "ok ID:START,..." (in the
#                       order given) or "error MESSAGE" for each. No GPU needed:
#                       tests/tests/infra.rs checks it against Layout::plan.
#
# Environment (written by Terraform to /etc/gpupool/mig.env):
#   GPUPOOL_MIG_PROFILES  this host's GPU model's profiles, space-separated
#                         NAME:ID:MEMORY_SLICES:START/START/... entries
#                         (from infra/modules/gpu-fleet/mig-profiles.json)
#   GPUPOOL_MIG_LAYOUT    the layout of every GPU, e.g. 3g.40gb,2g.20gb,1g.10gb,1g.10gb
#   GPUPOOL_MIG_STATE_DIR where the one-reboot marker lives (default
#                         /var/lib/gpupool)
#
# Placements are planned here, not left to nvidia-smi: created one after the
# other at the first free slot, 3g.40gb,2g.20gb,1g.10gb,1g.10gb fails (the
# last 1g would need slice 7, which no 1g placement covers), while 3g at slice
# 4 fits them all. The search is the one of Layout::plan in
# gpu-server/src/mig/profiles.rs: largest profiles first, backtracking.
set -euo pipefail

declare -A P_ID=() P_SIZE=() P_STARTS=()
NAMES=()
ORDER=()
START=()
PLAN=""
ERROR=""

die() {
    echo "gpupool-mig: $*" >&2
    exit 1
}

load_profiles() {
    local entry name id size starts
    [[ -n ${GPUPOOL_MIG_PROFILES:-} ]] || die "GPUPOOL_MIG_PROFILES is not set"
    for entry in $GPUPOOL_MIG_PROFILES; do
        IFS=: read -r name id size starts <<<"$entry"
        [[ $id =~ ^[0-9]+$ && $size =~ ^[1-8]$ && -n $starts ]] || die "bad profile entry '$entry'"
        name=${name,,}
        P_ID[$name]=$id
        P_SIZE[$name]=$size
        P_STARTS[$name]=${starts//\// }
    done
}

# Places ORDER[k..] on the memory slices not in USED; sets START[i]. Equal
# profiles are adjacent in ORDER and take ascending starts, so the search does
# not revisit permutations of identical instances.
place() {
    local k=$1 used=$2
    ((k < ${#ORDER[@]})) || return 0
    local i=${ORDER[k]} s mask min=0
    local name=${NAMES[i]}
    if ((k > 0)) && [[ ${NAMES[ORDER[k - 1]]} == "$name" ]]; then
        min=$((START[ORDER[k - 1]] + 1))
    fi
    for s in ${P_STARTS[$name]}; do
        ((s >= min)) || continue
        mask=$((((1 << P_SIZE[$name]) - 1) << s))
        ((used & mask)) && continue
        START[i]=$s
        place $((k + 1)) $((used | mask)) && return 0
    done
    return 1
}

# Plans one layout: on success sets PLAN to "ID:START,..." in the order given,
# else ERROR to the reason. No subshells: \`plan\` runs it thousands of times in
# the tests.
plan_layout() {
    local layout=$1 n i j key keys=() known total=0
    PLAN=""
    ERROR=""
    NAMES=()
    ORDER=()
    START=()
    layout=${layout//[[:space:]]/}
    [[ -n $layout ]] || {
        ERROR="empty layout"
        return 1
    }
    IFS=, read -ra NAMES <<<"${layout,,}"
    ((${#NAMES[@]} <= 7)) || {
        ERROR="${#NAMES[@]} instances: a GPU holds at most 7"
        return 1
    }
    for i in "${!NAMES[@]}"; do
        n=${NAMES[i]}
        if [[ -z ${P_ID[$n]:-} ]]; then
            known="${!P_ID[*]}"
            ERROR="no MIG profile '$n' on this GPU model (profiles: $known)"
            return 1
        fi
        # Sort key: larger profiles first, then by id, then input order (insertion sort).
        printf -v 'keys[i]' '%d %03d %02d' $((8 - P_SIZE[$n])) "${P_ID[$n]}" "$i"
        j=${#ORDER[@]}
        ORDER+=("$i")
        while ((j > 0)) && [[ ${keys[ORDER[j - 1]]} > ${keys[i]} ]]; do
            ORDER[j]=${ORDER[j - 1]}
            j=$((j - 1))
        done
        ORDER[j]=$i
    done
    for i in "${!NAMES[@]}"; do
        total=$((total + P_SIZE[${NAMES[i]}]))
    done
    if ((total > 8)); then
        ERROR="layout [$layout] needs $total memory slices: a GPU has 8"
        return 1
    fi
    if ! place 0 0; then
        ERROR="layout [$layout] does not fit on one GPU: no non-overlapping placements exist"
        return 1
    fi
    for i in "${!NAMES[@]}"; do
        key="${P_ID[${NAMES[i]}]}:${START[i]}"
        PLAN=${PLAN:+$PLAN,}$key
    done
}

cmd_plan() {
    local line
    load_profiles
    while IFS= read -r line || [[ -n $line ]]; do
        if plan_layout "$line"; then
            echo "ok $PLAN"
        else
            echo "error $ERROR"
        fi
    done
}

gpu_indices() {
    nvidia-smi --query-gpu=index --format=csv,noheader,nounits
}

mig_current() {
    nvidia-smi -i "$1" --query-gpu=mig.mode.current --format=csv,noheader | tr -d '[:space:]'
}

cmd_apply() {
    local marker=${GPUPOOL_MIG_STATE_DIR:-/var/lib/gpupool}/mig-reboot-done gpu pending=()
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found (is the NVIDIA driver installed?)"
    load_profiles
    [[ -n ${GPUPOOL_MIG_LAYOUT:-} ]] || die "GPUPOOL_MIG_LAYOUT is not set"
    plan_layout "$GPUPOOL_MIG_LAYOUT" || die "$ERROR"
    echo "gpupool-mig: layout $GPUPOOL_MIG_LAYOUT -> GPU instances (profile id:start) $PLAN"

    nvidia-smi -pm 1 >/dev/null || echo "gpupool-mig: could not enable persistence mode (continuing)"
    for gpu in $(gpu_indices); do
        if [[ $(mig_current "$gpu") != Enabled ]]; then
            nvidia-smi -i "$gpu" -mig 1 || true
            [[ $(mig_current "$gpu") == Enabled ]] || pending+=("$gpu")
        fi
    done
    if ((${#pending[@]} > 0)); then
        # The driver resets the GPU itself where it can; on NVSwitch systems
        # (p4d, p5) the mode change often waits for a reset that only a reboot
        # gives. MIG mode persists, so one reboot settles it.
        if [[ -e $marker ]]; then
            die "MIG mode still not enabled on GPU(s) ${pending[*]} after a reboot"
        fi
        mkdir -p "$(dirname "$marker")"
        touch "$marker"
        echo "gpupool-mig: MIG mode pending on GPU(s) ${pending[*]}: rebooting once"
        systemctl --no-block reboot
        # Hold gpupool-server.service back until the reboot takes us down.
        exec sleep 600
    fi
    rm -f "$marker"

    for gpu in $(gpu_indices); do
        # Start from nothing: compute instances first, then GPU instances. Both
        # commands fail when there is nothing to destroy, which is the usual case
        # at boot.
        nvidia-smi mig -i "$gpu" -dci >/dev/null 2>&1 || true
        nvidia-smi mig -i "$gpu" -dgi >/dev/null 2>&1 || true
        nvidia-smi mig -i "$gpu" -cgi "$PLAN" -C
    done
    nvidia-smi -L
}

case ${1:-} in
    apply) cmd_apply ;;
    plan) cmd_plan ;;
    *) die "usage: gpupool-mig apply|plan" ;;
esac
