#!/usr/bin/env bash
# Does asking for compressed answers pay (issue 14)? Cold `cp -r` of a folder of Binaries
# through a real mount, fhirfs asking for compressed answers (the default: `Accept-Encoding:
# gzip, deflate, br, zstd`) and with `--no-compression` (identity), over a link of limited
# bandwidth at network latency.
#
# Usage (as root, it mounts; needs /dev/fuse, curl and python3):
#   bench/compression.sh    # about 15 minutes once built
#   RUNS=1 CONTENTS=text LATENCIES=20 BANDWIDTHS=10MB CODINGS=zstd FETCHES=raw \
#       bench/compression.sh  # a quick smoke test
#
# For each CONTENT in CONTENTS="random text" (bench_server --content: pseudo-random bytes, which
# only shrink as base64, or clinical-note-like text), LATENCY in LATENCIES="20 50" (ms before
# every answer), BANDWIDTH in BANDWIDTHS="10MB unlimited" (bytes per second of one token bucket
# that every connection shares: a link; it carries the coded bytes) and CODING in
# CODINGS="zstd gzip" (what the server answers a client that accepts both; it compresses every
# read once at start-up, gzip level 6 or zstd level 3, so its CPU stays out of the timings):
# one server with SPEC="s*100=32KiB,m*60=200KiB,l*30=768KiB,x*10=2MiB" (200 Binaries, 57 MiB).
# Then for each FETCH in FETCHES="json raw" (fhirfs --fetch: FHIR JSON with base64 `data`, or
# the native bytes), RUNS=3 times, alternately: a fresh mount (cold) with compression, `cp -r`
# into tmpfs; a fresh mount with --no-compression, `cp -r`. Reported per configuration: the
# median (min-max) wall time of each, their ratio (compressed / identity, same run), the body
# bytes the server sent (its /stats `sent_bytes`, coded as on the wire) and the CPU time
# (user + system, from /proc/PID/stat before unmounting) fhirfs used, medians. Each step is
# bounded by `timeout` (LIMIT=120 s).
# Every copy is checked file by file against sha256 sums of the server's identity bytes
# (fetched once per content with curl), so that a copy with wrong bytes cannot pass; a copy
# that fails, times out or differs is reported in the table and makes the script fail.

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=${RUNS:-3}
CONTENTS=${CONTENTS:-random text}
LATENCIES=${LATENCIES:-20 50}
BANDWIDTHS=${BANDWIDTHS:-10MB unlimited}
CODINGS=${CODINGS:-zstd gzip}
FETCHES=${FETCHES:-json raw}
SPEC=${SPEC:-s*100=32KiB,m*60=200KiB,l*30=768KiB,x*10=2MiB}
# Longest a copy may take (s): 80 MB of JSON at 1 MB/s would fit.
LIMIT=${LIMIT:-120}
((RUNS >= 1)) || die "RUNS must be at least 1"
require_root_and_fuse
command -v sha256sum >/dev/null || die "sha256sum is needed"
build

MNT=$WORK/mnt
DST=$SHM/copy
FAILED=
CLK_TCK=$(getconf CLK_TCK)

# fs_cpu_ms PID: "user system" CPU time PID has used so far, in ms.
fs_cpu_ms() {
    awk -v hz="$CLK_TCK" '{ sub(/.*\) /, ""); printf "%d %d\n", $12 * 1000 / hz, $13 * 1000 / hz }' \
        "/proc/$1/stat"
}

# reference CONTENT: sha256 sums of every Binary's identity bytes into $WORK/sums.CONTENT (one
# server without latency, bandwidth or codings; curl four at a time) and the count of Binaries
# into REF_N.
reference() {
    local content=$1 ref=$SHM/ref
    start_server --spec "$SPEC" --content "$content"
    rm -rf "$ref"
    mkdir -p "$ref"
    list_ids "$BASE" "$WORK/ids" "$HELPER"
    xargs -r -P 4 -I '{}' curl -fsS -H 'Accept: application/octet-stream' -o "$ref/{}" \
        "$BASE/Binary/{}" <"$WORK/ids" || die "cannot fetch the reference bytes"
    (cd "$ref" && sha256sum -- *) >"$WORK/sums.$content"
    REF_N=$(grep -c . "$WORK/ids")
    (($(grep -c . "$WORK/sums.$content") == REF_N)) || die "the reference has not $REF_N files"
    rm -rf "$ref"
    stop_server
}

# copy_once KEY [fhirfs options...]: a fresh mount, `cp -r` of it into tmpfs, timed and
# checked; appends to T[KEY] (µs, X when it failed), SENT[KEY] (bytes), USR[KEY] and SYS[KEY]
# (CPU ms of fhirfs), and keeps what went wrong in BAD[KEY].
copy_once() {
    local key=$1 limit=$LIMIT why=
    shift
    rm -rf "$DST"
    mount_fs "$MNT" "$@" || die "cannot mount"
    stats_reset
    if time_us timeout "$limit" cp -r "$MNT" "$DST"; then
        if (($(find "$DST" -type f | wc -l) != REF_N)); then
            why="$(find "$DST" -type f | wc -l) files, not $REF_N"
        elif ! (cd "$DST" && sha256sum --quiet --strict -c "$WORK/sums.$content" >/dev/null 2>&1); then
            why="bytes differ from the server's"
        fi
    else
        why="failed or ran out of $limit s"
    fi
    local cpu
    read -r -a cpu <<<"$(fs_cpu_ms "$FS_PID")"
    unmount_fs
    SENT[$key]+=" $(python3 "$HELPER" stats-value "$STATS" sent_bytes)"
    USR[$key]+=" ${cpu[0]}"
    SYS[$key]+=" ${cpu[1]}"
    if [[ -n $why ]]; then
        say "  $key: $why"
        T[$key]+=" X"
        BAD[$key]=$why
        FAILED=1
    else
        T[$key]+=" $ELAPSED"
        say "  $key: $(ratio "$ELAPSED" 1000000) s"
    fi
}

# med KEY ARRAY: the median of ARRAY[KEY]'s numbers, empty when a run failed.
med() {
    local -n values_of=$2
    local values
    read -r -a values <<<"${values_of[$1]:-X}"
    if [[ " ${values[*]} " == *" X "* ]]; then return 0; fi
    median "${values[@]}"
}

# secs KEY: the median time in seconds with the range, or what went wrong.
secs() {
    local values
    if [[ -n ${BAD[$1]:-} ]]; then
        echo "**${BAD[$1]}**"
        return 0
    fi
    read -r -a values <<<"${T[$1]}"
    printf '%s (%s)\n' "$(ratio "$(med "$1" T)" 1000000)" "$(printf '%s\n' "${values[@]}" |
        awk 'NR == 1 || $1 < lo { lo = $1 } NR == 1 || $1 > hi { hi = $1 }
            END { printf "%.2f-%.2f", lo / 1e6, hi / 1e6 }')"
}

{
    echo "| content | fetch | latency | bandwidth | coding | cp -r, compressed (s) | cp -r, --no-compression (s) | time ratio | MB sent, compressed / identity (ratio) | fhirfs CPU ms user+sys, compressed / identity |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
} >"$RESULTS"

for content in $CONTENTS; do
    reference "$content"
    for lat in $LATENCIES; do
        for bw in $BANDWIDTHS; do
            for coding in $CODINGS; do
                args=(--spec "$SPEC" --content "$content" --latency-ms "$lat" --compress "$coding")
                link=unlimited
                if [[ $bw != unlimited ]]; then
                    args+=(--bandwidth "$bw")
                    link="$bw/s"
                fi
                start_server "${args[@]}"
                for fetch in $FETCHES; do
                    unset T SENT USR SYS BAD
                    declare -A T=() SENT=() USR=() SYS=() BAD=()
                    for ((run = 1; run <= RUNS; run++)); do
                        say "$content, --fetch $fetch, $lat ms, $link, $coding: run $run of $RUNS"
                        copy_once on --fetch "$fetch"
                        copy_once off --fetch "$fetch" --no-compression
                    done
                    on=$(med on T) off=$(med off T) time_ratio=-
                    if [[ -n $on && -n $off ]]; then time_ratio=$(ratio "$on" "$off"); fi
                    sent_on=$(med on SENT) sent_off=$(med off SENT)
                    printf '| %s | %s | %s ms | %s | %s | %s | %s | %s | %s / %s (%s) | %s+%s / %s+%s |\n' \
                        "$content" "$fetch" "$lat" "$link" "$coding" \
                        "$(secs on)" "$(secs off)" "$time_ratio" \
                        "$(ratio "$sent_on" 1000000)" "$(ratio "$sent_off" 1000000)" \
                        "$(ratio "$sent_on" "$sent_off")" "$(med on USR)" "$(med on SYS)" \
                        "$(med off USR)" "$(med off SYS)" | tee -a "$RESULTS"
                done
                stop_server
            done
        done
    done
done

print_table "bench/compression.sh (SPEC=$SPEC, RUNS=$RUNS)"
[[ -z $FAILED ]] || die "some copies failed or differ (see the table)"
