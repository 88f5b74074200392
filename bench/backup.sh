#!/usr/bin/env bash
# fhirfs with backup tools: ls, find, du, rsync, cp -r and tar over many Binaries on a server
# that answers every request after an injected latency.
#
# Usage (as root, it mounts; needs /dev/fuse, curl and python3; installs rsync with apt-get if
# it is missing):
#   bench/backup.sh         # all three parts, about 10 minutes: the cold listings of Part A
#                           # and B are slow by design (see below)
#   PARTS=C bench/backup.sh # only Part C (PARTS names the parts to run, default "A B C")
#   FILES=500 SMALL_FILES=50 PARTS="A B" bench/backup.sh             # a quick smoke test of A, B
#   COPY_SPEC='s*60=4KiB,x*3=1MiB' LATENCIES="0 20" PARTS=C bench/backup.sh  # ... and of C
#
# Part A: FILES=10000 Binaries of 2 KiB, LATENCY_MS=5 ms latency per request, default fhirfs options. In order,
# each timed, with the server requests it caused (from the bench server's /stats):
#   cold `ls -l`, warm `ls -l`, `find`, `du -s`, `rsync -a MNT/ DEST/` twice.
# Each is printed next to the same tool run on the local copy that rsync made (DEST), as a
# baseline. Targets: warm `ls -l` < 1 s; the second rsync makes 0 content GETs and takes < 2 s.
# Part B: SMALL_FILES=1000 Binaries at SLOW_MS=50 ms latency, cold `ls -l` on a fresh mount; target < 10 s. Run
# twice: with a server that honours `_elements` (the listing gives no sizes, as HAPI or Helios
# do) and with one that sends `data` in searches anyway (--listing-data).
# Part C (issue 13), copies at network latency: for each LATENCY in LATENCIES="0 5 20 50" (ms
# per request), a server with COPY_SPEC="s*700=4KiB,m*200=32KiB,l*80=200KiB,x*20=2MiB" (1000
# Binaries, 65 MiB) and, each on a fresh mount (--cache-size CACHE_MIB=512 MiB) so that it
# starts cold: `cp -r MNT DST`; `rsync -a MNT/ DST/` and at once a second one on the same mount;
# `tar -cf - -C MNT . | wc -c`; and `ls MNT; cat MNT/ID` (one open in a cold folder). Each
# copy is checked (file names, total bytes, `cmp` of three files against curl's bytes).
# Baselines at the same latency, in the same run: a script that lists the ids with curl
# (`_count=1000&_elements=id`, following `next` links) then runs one `curl` per Binary (Accept:
# application/octet-stream) one after the other, and the same with `xargs -P 8`. Reported:
# the median of RUNS_C=1 runs (with the range when more), the ratios to both scripts, the
# server requests of each step and fhirfs's peak RSS (VmHWM) in each step. Targets: cold
# `cp -r` and `rsync -a` <= 1.0x the 8-parallel script at every latency and <= 0.15x the
# sequential script at 20 ms and more; the second rsync makes 0 content GETs; the one open
# makes exactly 1 content GET; peak RSS <= cache + 64 MiB. With SPLIT=1 (the default) all of
# it runs once more at 0 ms with `bench_server --split-writes` (headers and body in separate
# writes, Nagle on, as Python's http.server does; rows "split writes").
# Every step is bounded by `timeout`; a step that runs out is reported as "> N s".

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PARTS=${PARTS:-A B C}
# want PART: whether PARTS names it ("A B C", "A,C", "c"...).
want() { [[ ${PARTS^^} == *"$1"* ]]; }
want A || want B || want C || die "PARTS=$PARTS names none of A, B, C"

require_root_and_fuse
if (want A || want C) && ! command -v rsync >/dev/null; then
    say "installing rsync"
    apt-get install -y -qq rsync >/dev/null || {
        apt-get update -qq && apt-get install -y -qq rsync >/dev/null
    } || die "cannot install rsync"
fi
build

# Sizes of the parts (smaller values make a quick smoke test of the script).
FILES=${FILES:-10000} LATENCY_MS=${LATENCY_MS:-5} SMALL_FILES=${SMALL_FILES:-1000} SLOW_MS=${SLOW_MS:-50}
COPY_SPEC=${COPY_SPEC:-s*700=4KiB,m*200=32KiB,l*80=200KiB,x*20=2MiB}
LATENCIES=${LATENCIES:-0 5 20 50} RUNS_C=${RUNS_C:-1} SPLIT=${SPLIT:-1} CACHE_MIB=${CACHE_MIB:-512}
((RUNS_C >= 1)) || die "RUNS_C must be at least 1"
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
if want A; then
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
fi

# --- Part B ---
if want B; then
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
fi

# --- Part C ---
# curl_copy BASE DST PARALLEL IDS HELPER: the baseline backup script: lists the ids (into IDS),
# then fetches the bytes of each Binary into DST/ID with a curl process of its own, PARALLEL at
# a time (1: one after the other, from a shell loop).
curl_copy() {
    set -euo pipefail
    local base=$1 dst=$2 parallel=$3 ids=$4 helper=$5 id
    mkdir -p "$dst"
    list_ids "$base" "$ids" "$helper"
    if ((parallel > 1)); then
        xargs -r -P "$parallel" -I '{}' curl -fsS -H 'Accept: application/octet-stream' \
            -o "$dst/{}" "$base/Binary/{}" <"$ids"
    else
        while IFS= read -r id; do
            curl -fsS -H 'Accept: application/octet-stream' -o "$dst/$id" "$base/Binary/$id"
        done <"$ids"
    fi
}
# tar_size DIR OUT: archives DIR into a pipe and writes the archive's size to OUT. Not
# `tar -cf /dev/null`: GNU tar notices that its archive is /dev/null and then reads no file
# contents at all. `wc -c` reads the pipe to its end as `cat >/dev/null` would, and counts.
tar_size() {
    set -o pipefail
    tar -cf - -C "$1" . | wc -c >"$2"
}
# one_open DIR ID: what a user does in a folder they have never opened: list it, read one file.
one_open() { ls "$1" >/dev/null && cat "$1/$2" >/dev/null; }
# The steps run under `timeout`, in a child bash.
export -f list_ids curl_copy tar_size one_open

# c_step KEY LIMIT-SECS CMD...: times CMD; appends its µs (X when it failed or timed out) to
# C_T[KEY], keeps its server requests in C_REQ[KEY]; C_OK is 1 when it succeeded.
c_step() {
    local key=$1 limit=$2
    shift 2
    say "  $key"
    stats_reset
    if time_us timeout "$limit" "$@"; then
        C_T[$key]+=" $ELAPSED"
        C_OK=1
    else
        say "  $key: failed or ran out of $limit s"
        C_T[$key]+=" X"
        C_OK=
    fi
    C_REQ[$key]=$(stats)
}

c_mount() { mount_fs "$MNT" --cache-size "${CACHE_MIB}MiB" || die "cannot mount"; }
# c_unmount KEY: keeps the daemon's peak RSS (kB, the largest over the runs) in C_RSS[KEY],
# then unmounts.
c_unmount() {
    local hwm
    hwm=$(awk '/^VmHWM/{ print $2 }' "/proc/$FS_PID/status")
    if ((hwm > ${C_RSS[$1]:-0})); then C_RSS[$1]=$hwm; fi
    unmount_fs
}

# check_copy KEY DIR: compares the copy in DIR with the listing (names), the server's total
# (bytes) and the reference files (cmp); a mismatch is kept in C_BAD[KEY] for the table.
check_copy() {
    local key=$1 dir=$2 why='' names total id
    names=$(find "$dir" -type f -printf '%P\n' | sort)
    if [[ $names != "$C_NAMES" ]]; then
        why="$(grep -c . <<<"$names") files, not $C_N, or other names"
    else
        total=$(find "$dir" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
        if ((total != C_BYTES)); then why="$total bytes, not $C_BYTES"; fi
        for id in "${C_REF_IDS[@]}"; do
            if [[ -z $why ]] && ! cmp -s "$C_REF/$id" "$dir/$id"; then
                why="$id differs from the server's bytes"
            fi
        done
    fi
    if [[ -n $why ]]; then
        say "  $key: the copy is wrong: $why"
        C_BAD[$key]=$why
    fi
}

# c_med KEY: the median µs of C_T[KEY], empty when a run failed.
c_med() {
    local values
    read -r -a values <<<"${C_T[$1]:-X}"
    if [[ " ${values[*]} " == *" X "* ]]; then return 0; fi
    median "${values[@]}"
}
# c_secs KEY LIMIT: the median in seconds, with the range when there are more runs.
c_secs() {
    local values med
    read -r -a values <<<"${C_T[$1]:-X}"
    if [[ " ${values[*]} " == *" X "* ]]; then
        echo "> $2"
        return 0
    fi
    med=$(median "${values[@]}")
    if ((${#values[@]} == 1)); then
        ratio "$med" 1000000
    else
        printf '%s (%s)\n' "$(ratio "$med" 1000000)" "$(printf '%s\n' "${values[@]}" |
            awk 'NR == 1 || $1 < lo { lo = $1 } NR == 1 || $1 > hi { hi = $1 }
                END { printf "%.2f-%.2f", lo / 1e6, hi / 1e6 }')"
    fi
}
# c_ratio US US: their ratio, "-" when either is missing.
c_ratio() { if [[ -z $1 || -z $2 ]]; then echo -; else ratio "$1" "$2"; fi; }
content_gets() { echo $(($(count json "$1") + $(count raw "$1"))); }
# c_checked KEY: "-" or what is wrong with the copy.
c_checked() {
    if [[ -n ${C_BAD[$1]:-} ]]; then echo "**no** (copy: ${C_BAD[$1]})"; else echo -; fi
}

# c_copy_row KEY NAME: a cold copy through the mount next to both scripts.
c_copy_row() {
    local key=$1 name=$2 us par seq r_par r_seq target ok
    us=$(c_med "$key") par=$(c_med par8) seq=$(c_med seq)
    r_par=$(c_ratio "$us" "$par") r_seq=$(c_ratio "$us" "$seq")
    target="<= 1.0x par8" ok=yes
    [[ $r_par != - && $(met "$r_par" 1.0) == yes ]] || ok="**no**"
    if ((lat >= 20)); then
        target+=", <= 0.15x seq"
        [[ $r_seq != - && $(met "$r_seq" 0.15) == yes ]] || ok="**no**"
    fi
    if [[ $key == tar ]]; then target=- ok=-; fi
    if [[ -n ${C_BAD[$key]:-} ]]; then ok="**no** (copy: ${C_BAD[$key]})"; fi
    row "$name, $C_N files, $label (s)" "$(c_secs "$key" "$limit")" \
        "par8 $(c_secs par8 "$limit"), seq $(c_secs seq "$limit")" \
        "${r_par}x par8, ${r_seq}x seq" "$target" "$ok" "${C_REQ[$key]}"
}

if want C; then
    C_DST=$SHM/copy
    C_REF=$SHM/ref
    configs=()
    for lat in $LATENCIES; do configs+=("$lat:plain"); done
    if [[ $SPLIT == 1 ]]; then configs+=("0:split"); fi
    for config in "${configs[@]}"; do
        lat=${config%%:*}
        args=(--spec "$COPY_SPEC" --latency-ms "$lat")
        label="$lat ms latency"
        if [[ ${config#*:} == split ]]; then
            args+=(--split-writes)
            label="$lat ms latency, split writes"
        fi
        start_server "${args[@]}"
        # The server's count and total bytes, from its start-up line.
        read -r C_N C_BYTES < <(awk '/ Binaries, /{ n = $2; b = $4 } END { print n, b }' \
            "$WORK/server.log")
        # What every copy must hold: the listing's names and the bytes of three Binaries.
        list_ids "$BASE" "$WORK/c_expected" "$HELPER" || die "cannot list the server's ids"
        C_NAMES=$(sort "$WORK/c_expected")
        (($(grep -c . <<<"$C_NAMES") == C_N)) || die "the listing does not give $C_N ids"
        mapfile -t C_REF_IDS < <(sed -n "1p;$(((C_N + 1) / 2))p;\$p" <<<"$C_NAMES")
        C_ONE=${C_REF_IDS[1]}
        rm -rf "$C_REF"
        mkdir -p "$C_REF"
        for id in "${C_REF_IDS[@]}"; do
            curl -fsS -H 'Accept: application/octet-stream' -o "$C_REF/$id" "$BASE/Binary/$id"
        done
        # Every step may take as long as sequential requests with 100 ms of overhead each.
        limit=$((60 + C_N * (lat + 100) / 1000))
        unset C_T C_REQ C_RSS C_BAD
        declare -A C_T=() C_REQ=() C_RSS=() C_BAD=()
        for ((run = 1; run <= RUNS_C; run++)); do
            say "Part C: $C_N Binaries ($C_BYTES bytes), $label, run $run of $RUNS_C"
            rm -rf "$C_DST"
            c_step seq "$limit" bash -c 'curl_copy "$@"' curl_copy \
                "$BASE" "$C_DST" 1 "$WORK/c_ids" "$HELPER"
            if [[ -n $C_OK ]]; then check_copy seq "$C_DST"; fi
            rm -rf "$C_DST"
            c_step par8 "$limit" bash -c 'curl_copy "$@"' curl_copy \
                "$BASE" "$C_DST" 8 "$WORK/c_ids" "$HELPER"
            if [[ -n $C_OK ]]; then check_copy par8 "$C_DST"; fi
            rm -rf "$C_DST"

            c_mount
            c_step cp "$limit" cp -r "$MNT" "$C_DST"
            if [[ -n $C_OK ]]; then check_copy cp "$C_DST"; fi
            c_unmount cp
            rm -rf "$C_DST"

            c_mount
            mkdir -p "$C_DST"
            c_step rsync "$limit" rsync -a "$MNT/" "$C_DST/"
            if [[ -n $C_OK ]]; then check_copy rsync "$C_DST"; fi
            c_step rsync2 "$limit" rsync -a "$MNT/" "$C_DST/"
            c_unmount rsync
            rm -rf "$C_DST"

            c_mount
            c_step tar "$limit" bash -c 'tar_size "$@"' tar_size "$MNT" "$WORK/c_tar"
            if [[ -n $C_OK ]] && (($(<"$WORK/c_tar") < C_BYTES)); then
                C_BAD[tar]="an archive of $(<"$WORK/c_tar") bytes holds less than $C_BYTES"
                say "  tar: ${C_BAD[tar]}"
            fi
            c_unmount tar

            c_mount
            c_step open 60 bash -c 'one_open "$@"' one_open "$MNT" "$C_ONE"
            # Read-ahead the open may have started shows in the requests a moment later.
            sleep 1
            C_REQ[open]=$(stats)
            c_unmount open
        done
        stop_server

        for key in seq par8; do
            name="sequential curl script"
            if [[ $key == par8 ]]; then name="curl script, xargs -P 8"; fi
            row "baseline: $name, $C_N files, $label (s)" - "$(c_secs "$key" "$limit")" - - \
                "$(c_checked "$key")" "${C_REQ[$key]}"
        done
        c_copy_row cp "cold cp -r"
        c_copy_row rsync "cold rsync -a"
        rs2_gets=$(content_gets "${C_REQ[rsync2]}") rs2_ok=yes
        if [[ -z $(c_med rsync2) ]] || ((rs2_gets != 0)); then rs2_ok="**no**"; fi
        row "rsync -a again, same mount, $label (s)" "$(c_secs rsync2 "$limit")" - - \
            "0 content GETs" "$rs2_ok ($rs2_gets GETs)" "${C_REQ[rsync2]}"
        c_copy_row tar "cold tar -cf - (into a pipe)"
        open_gets=$(content_gets "${C_REQ[open]}") open_ok=yes
        if [[ -z $(c_med open) ]] || ((open_gets != 1)); then open_ok="**no**"; fi
        row "one open in a cold folder (ls; cat $C_ONE), $label (s)" "$(c_secs open 60)" - - \
            "1 content GET" "$open_ok ($open_gets GETs)" "${C_REQ[open]}"
        rss_limit=$((CACHE_MIB + 64)) rss_max=0 rss_list=
        for key in cp rsync tar open; do
            kb=${C_RSS[$key]:-0}
            rss_list+="${rss_list:+, }$key $((kb / 1024))"
            if ((kb > rss_max)); then rss_max=$kb; fi
        done
        row "peak RSS of fhirfs per step, $label (MiB)" "$rss_list" "$rss_limit (cache + 64 MiB)" \
            "$(ratio "$((rss_max / 1024))" "$rss_limit")" "<= $rss_limit MiB" \
            "$(met "$((rss_max / 1024))" "$rss_limit")" -
    done
fi

print_table "bench/backup.sh"
