#!/usr/bin/env bash
# fhirfs with backup tools: ls, find, du and rsync over thousands of small Binaries on a server
# that answers every request after an injected latency.
#
# Usage (as root, it mounts; needs /dev/fuse, curl and python3; installs rsync with apt-get if
# it is missing):
#   bench/backup.sh         # a few minutes: the cold listings are slow by design (see below)
#   FILES=500 SMALL_FILES=50 bench/backup.sh    # a quick smoke test of the script itself
#
# Part A: FILES=10000 Binaries of 2 KiB, LATENCY_MS=5 ms latency per request, default fhirfs options. In order,
# each timed, with the server requests it caused (from the bench server's /stats):
#   cold `ls -l`, warm `ls -l`, `find`, `du -s`, `rsync -a MNT/ DEST/` twice.
# Each is printed next to the same tool run on the local copy that rsync made (DEST), as a
# baseline. Targets: warm `ls -l` < 1 s; the second rsync makes 0 content GETs and takes < 2 s.
# Part B: SMALL_FILES=1000 Binaries at SLOW_MS=50 ms latency, cold `ls -l` on a fresh mount; target < 10 s. Run
# twice: with a server that honours `_elements` (the listing gives no sizes, as HAPI or Helios
# do) and with one that sends `data` in searches anyway (--listing-data).
# Every step is bounded by `timeout`; a step that runs out is reported as "> N s".

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_root_and_fuse
if ! command -v rsync >/dev/null; then
    say "installing rsync"
    apt-get install -y -qq rsync >/dev/null || {
        apt-get update -qq && apt-get install -y -qq rsync >/dev/null
    } || die "cannot install rsync"
fi
build

# Sizes of the two parts (smaller values make a quick smoke test of the script).
FILES=${FILES:-10000} LATENCY_MS=${LATENCY_MS:-5} SMALL_FILES=${SMALL_FILES:-1000} SLOW_MS=${SLOW_MS:-50}
MNT=$WORK/mnt
DEST=$WORK/dest
COPY=$WORK/copy
table_header

# step NAME LIMIT-SECS CMD...: times CMD through the mount; sets STEP_US (empty when it timed
# out) and STEP_REQ.
step() {
    local name=$1 limit=$2
    shift 2
    say "$name"
    stats_reset
    if time_us timeout "$limit" "$@"; then
        STEP_US=$ELAPSED
    else
        say "$name: failed or ran out of $limit s"
        STEP_US=
    fi
    STEP_REQ=$(stats)
}

# seconds US-OR-EMPTY LIMIT
seconds() {
    if [[ -z $1 ]]; then echo "> $2"; else ratio "$1" 1000000; fi
}

# --- Part A ---
start_server --files "$FILES" --size 2KiB --latency-ms "$LATENCY_MS"
mount_fs "$MNT" || die "cannot mount"
step "cold ls -l of $FILES ($LATENCY_MS ms latency)" 240 ls -l "$MNT"
cold_ls=$STEP_US cold_ls_req=$STEP_REQ
step "warm ls -l" 60 ls -l "$MNT"
warm_ls=$STEP_US warm_ls_req=$STEP_REQ
step "find" 60 find "$MNT"
find_us=$STEP_US find_req=$STEP_REQ
step "du -s" 60 du -s "$MNT"
du_us=$STEP_US du_req=$STEP_REQ
mkdir -p "$DEST"
step "rsync -a, first" 240 rsync -a "$MNT/" "$DEST/"
rs1=$STEP_US rs1_req=$STEP_REQ
step "rsync -a, second" 120 rsync -a "$MNT/" "$DEST/"
rs2=$STEP_US rs2_req=$STEP_REQ

copied=$(find "$DEST" -type f | wc -l)
((copied == FILES)) || die "rsync copied $copied files, not $FILES"
for id in f00000 "f$(printf %05d $((FILES / 2)))" "f$(printf %05d $((FILES - 1)))"; do
    curl -fsS -H 'Accept: application/octet-stream' "$BASE/Binary/$id" | cmp - "$DEST/$id" ||
        die "$id copied by rsync differs from the server's bytes"
done
unmount_fs
stop_server

# Baselines: the same tools on the local copy (page cache warm, as the warm mount is).
time_us ls -l "$DEST"
b_ls=$ELAPSED
time_us find "$DEST"
b_find=$ELAPSED
time_us du -s "$DEST"
b_du=$ELAPSED
mkdir -p "$COPY"
time_us rsync -a "$DEST/" "$COPY/"
b_rs1=$ELAPSED
time_us rsync -a "$DEST/" "$COPY/"
b_rs2=$ELAPSED

# ratio-or-dash US BASE
rel() { if [[ -z $1 ]]; then echo -; else ratio "$1" "$2"; fi; }
gets() { echo $(($(count json "$1") + $(count raw "$1"))); }
row "cold ls -l, $FILES files, $LATENCY_MS ms latency (s)" "$(seconds "$cold_ls" 240)" "$(seconds "$b_ls") (local copy)" \
    "$(rel "$cold_ls" "$b_ls")" - - "$cold_ls_req"
row "warm ls -l, $FILES files (s)" "$(seconds "$warm_ls" 60)" "$(seconds "$b_ls") (local copy)" \
    "$(rel "$warm_ls" "$b_ls")" "< 1 s" "$(met "$(seconds "$warm_ls" 60 | tr -d '>')" 0.999)" "$warm_ls_req"
row "find, $FILES files (s)" "$(seconds "$find_us" 60)" "$(seconds "$b_find") (local copy)" \
    "$(rel "$find_us" "$b_find")" - - "$find_req"
row "du -s, $FILES files (s)" "$(seconds "$du_us" 60)" "$(seconds "$b_du") (local copy)" \
    "$(rel "$du_us" "$b_du")" - - "$du_req"
row "rsync -a, first, $FILES files (s)" "$(seconds "$rs1" 240)" "$(seconds "$b_rs1") (local copy)" \
    "$(rel "$rs1" "$b_rs1")" - - "$rs1_req"
rs2_gets=$(gets "$rs2_req")
rs2_ok=no
if [[ -n $rs2 ]] && ((rs2 < 2000000 && rs2_gets == 0)); then rs2_ok=yes; fi
row "rsync -a, second, $FILES files (s)" "$(seconds "$rs2" 120)" "$(seconds "$b_rs2") (local copy)" \
    "$(rel "$rs2" "$b_rs2")" "< 2 s, 0 GETs" "$rs2_ok ($rs2_gets GETs)" "$rs2_req"

# --- Part B ---
for listing in subset data; do
    args=(--files "$SMALL_FILES" --size 2KiB --latency-ms "$SLOW_MS")
    label="listing without sizes"
    if [[ $listing == data ]]; then
        args+=(--listing-data)
        label="listing with data"
    fi
    start_server "${args[@]}"
    mount_fs "$MNT" || die "cannot mount"
    step "cold ls -l of $SMALL_FILES ($SLOW_MS ms latency, $label)" 120 ls -l "$MNT"
    # The baseline: the same number of sequential requests, one curl process for all of them.
    urls=()
    for ((i = 0; i < SMALL_FILES; i += (SMALL_FILES + 9) / 10)); do urls+=("$BASE/Binary/f$(printf %05d "$i")"); done
    time_us curl -fsS -H 'Accept: application/fhir+json' "${urls[@]}"
    per_get=$((ELAPSED / ${#urls[@]}))
    row "cold ls -l, $SMALL_FILES files, $SLOW_MS ms latency, $label (s)" "$(seconds "$STEP_US" 120)" \
        "$(ms "$per_get") ms per sequential GET" "-" "< 10 s" \
        "$(met "$(seconds "$STEP_US" 120 | tr -d '>')" 9.999)" "$STEP_REQ"
    unmount_fs
    stop_server
done

print_table "bench/backup.sh"
