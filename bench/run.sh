#!/usr/bin/env bash
# fhirfs benchmarks: what a mount costs next to plain HTTP and plain memory.
#
# Usage (as root, it mounts; needs /dev/fuse, curl and python3):
#   bench/run.sh            # about 1-2 minutes once built; prints a Markdown table at the end
#   RUNS=9 bench/run.sh     # more repetitions per measurement (default 5)
#
# It builds `target/release/fhirfs` and the bench server (testserver/src/bin/bench_server.rs,
# a FHIR server that encodes every body once, so the mount is what is measured), starts one
# server on 127.0.0.1 and mounts it on a temp dir. Every figure is the median of RUNS runs and is
# printed next to a baseline measured in the same run, with their ratio and the server requests
# the mount made (from the server's /stats):
#
# 1. cold `cat` of 1, 10 and 64 MiB Binaries through the mount (ids never read before, so
#    neither fhirfs nor the kernel has them) vs `curl -H 'Accept: application/fhir+json'` of
#    the same JSON from the same server. Target: ratio <= 1.5 at 64 MiB. First 64 MiB files
#    opened by id before anything is listed (the default `--fetch auto` reads them raw, with a
#    `_summary=true` read beside each for the metadata a listing would have given), then,
#    after a plain `ls` of the folder (readdir only: no stat, no content), the 1, 10 and
#    64 MiB files (auto reads them raw, streamed: the size comes with the headers, reads are
#    served as the body arrives).
#    The by-id case is also compared with curl of the raw bytes into new tmpfs files: a fresh
#    mount has no recycled buffers, so it pays for new memory as curl into tmpfs does.
#    Under each 64 MiB row: the CPU time per file of fhirfs, the server and cat, and the share
#    of all CPUs they kept busy during the reads.
#    The listed 64 MiB case is also compared with curl of the raw bytes, and the first byte
#    of a cold 64 MiB file (open + read of 1 byte) with an HTTP GET's first body byte.
# 2. warm `cat` of the same files (read before, same mount; each of the RUNS files 4 times) vs
#    `cat` of each file's copy in tmpfs (/dev/shm). Target: ratio <= 1.2. The bytes are
#    checked with cmp first.
# 3. time to first byte (open + read of 1 byte, timed in-process) of 1 KiB files: cold (new ids;
#    by id before the listing, and listed) vs an HTTP GET up to the first body byte on a new
#    connection; warm vs tmpfs. Target: warm < 1 ms.
# 4. six parallel `cat`s of files the server delays by 2 s each, vs six parallel curls of them.
#    Target: about 2 s, not 12.
# 5. eight concurrent `cat`s of one cold id (the server delays it 300 ms). Target: 1 GET.
# 6. peak RSS (VmHWM) of a daemon mounted with --cache-size 256MiB while 32 x 64 MiB files
#    (2 GiB) are read one after another, with --fetch json and after a listing (raw), each on a
#    fresh mount. Target: <= cache + 64 MiB = 320 MiB.
# 7. cold 64 MiB with `--fetch json` and `--fetch raw`, only if `fhirfs --help` lists --fetch,
#    each on a fresh mount, vs curl to /dev/null and vs curl into new tmpfs files.
#
# Timing uses bash's $EPOCHREALTIME around each command (no hyperfine needed); commands are
# interleaved fhirfs/baseline so that noise from other load hits both. The machine's other load
# is not controlled: run it on a quiet machine and compare ratios rather than absolute times.
# Logs stay in /tmp/fhirfs-bench.* when a run fails.

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUNS=${RUNS:-5}
((RUNS >= 1)) || die "RUNS must be at least 1"
require_root_and_fuse
build

HAS_FETCH=
if "$FHIRFS" --help | grep -q -- '--fetch'; then HAS_FETCH=1; fi

spec="u64m*$RUNS=64MiB,u1k*$RUNS=1KiB,c1m*$RUNS=1MiB,c10m*$RUNS=10MiB,c64m*$RUNS=64MiB,s64m*$RUNS=64MiB,t1k*$RUNS=1KiB"
spec+=",slow*6=256KiB,herd=1MiB,r64m*32=64MiB"
if [[ -n $HAS_FETCH ]]; then spec+=",fj64m*$RUNS=64MiB,fr64m*$RUNS=64MiB"; fi
delays=(--delay-id herd=300)
for i in 0 1 2 3 4 5; do delays+=(--delay-id "slow-$i=2000"); done
start_server --spec "$spec" "${delays[@]}"

MNT=$WORK/mnt

# cold_vs_curl PREFIX ACCEPT: `cat`s $MNT/PREFIX-0 .. -(RUNS-1), never read before, then curls
# the same ids with ACCEPT; sets COLD_US and CURL_US (the medians) and REQ (what the mount
# asked the server).
cold_vs_curl() {
    local prefix=$1 accept=$2 i cold=() curls=() fs0 server0 cat0 start wall
    stats_reset
    fs0=$(cpu_ms "$FS_PID") server0=$(cpu_ms "$SERVER_PID")
    children_ms
    cat0=$CHILDREN_MS start=$(now_us)
    for ((i = 0; i < RUNS; i++)); do
        time_us cat "$MNT/$prefix-$i"
        cold+=("$ELAPSED")
    done
    wall=$(($(now_us) - start))
    children_ms
    cpu_per_file "$wall" "$CHILDREN_MS" "$cat0" \
        "$(cpu_ms "$FS_PID")" "$fs0" "$(cpu_ms "$SERVER_PID")" "$server0"
    REQ=$(stats)
    for ((i = 0; i < RUNS; i++)); do
        time_us curl -fsS -H "Accept: $accept" "$BASE/Binary/$prefix-$i" -o /dev/null
        curls+=("$ELAPSED")
    done
    say "  each run (µs): ${cold[*]}"
    COLD_US=$(median "${cold[@]}") CURL_US=$(median "${curls[@]}")
}

# cpu_per_file WALL_US CAT1 CAT0 FS1 FS0 SERVER1 SERVER0: sets CPU_FILE ("fhirfs / server / cat"
# CPU ms per file, from the before and after figures of the RUNS reads) and CPU_BUSY (the share
# of all CPUs they kept busy over the reads' wall time).
cpu_per_file() {
    read -r CPU_FILE CPU_BUSY < <(awk -v wall="$1" -v n="$RUNS" -v cpus="$(nproc)" \
        -v cat="$2" -v cat0="$3" -v fs="$4" -v fs0="$5" -v server="$6" -v server0="$7" 'BEGIN {
            cat -= cat0; fs -= fs0; server -= server0
            printf "%.1f/%.1f/%.1f %.0f%%\n", fs / n, server / n, cat / n,
                (fs + server + cat) * 1000 / wall / cpus * 100
        }')
    CPU_FILE=${CPU_FILE//\// \/ }
}

# cpu_row: the CPU row under a cold-read row.
cpu_row() {
    row "  CPU per file, fhirfs / server / cat (ms)" "$CPU_FILE" - - - - \
        "$CPU_BUSY of $(nproc) CPUs busy during the reads"
}

# curl_into_tmpfs PREFIX ACCEPT: curls PREFIX-0 .. -(RUNS-1) with ACCEPT into new files in tmpfs,
# kept until all are timed (as the mount keeps what fits in its cache); sets STORE_US (the
# median). This is what keeping the bytes in new memory costs: on this VM 64 MiB of new pages
# cost about as much as curl's whole download to /dev/null (measured by hand: python3 writes
# 64 MiB into new pages in 27 ms, into pages already mapped in 6 ms), and a fresh mount has no
# recycled buffers until its cache is full.
curl_into_tmpfs() {
    local prefix=$1 accept=$2 i stored=()
    for ((i = 0; i < RUNS; i++)); do
        time_us curl -fsS -H "Accept: $accept" "$BASE/Binary/$prefix-$i" -o "$SHM/stored-$i"
        stored+=("$ELAPSED")
    done
    rm -f "$SHM"/stored-*
    STORE_US=$(median "${stored[@]}")
}

# first_bytes OURS BASELINE_MODE THEIRS: the helper's first-byte times (µs) of the mount's
# paths in the array named OURS, counting the server requests they make (REQ), and then of the
# array named THEIRS with helper mode BASELINE_MODE (ttfb for files, ttfb-http for URLs); sets
# FIRST_US and BASE_US (the medians).
first_bytes() {
    local -n ours=$1 theirs=$3
    local first base
    stats_reset
    mapfile -t first < <(python3 "$HELPER" ttfb "${ours[@]}")
    REQ=$(stats)
    mapfile -t base < <(python3 "$HELPER" "$2" "${theirs[@]}")
    FIRST_US=$(median "${first[@]}") BASE_US=$(median "${base[@]}")
}

# files_of PREFIX: sets PATHS (in the mount) and URLS (on the server) of PREFIX-0 .. -(RUNS-1).
files_of() {
    local i
    PATHS=() URLS=()
    for ((i = 0; i < RUNS; i++)); do
        PATHS+=("$MNT/$1-$i")
        URLS+=("$BASE/Binary/$1-$i")
    done
}

# ttfb_vs_http PREFIX: the first byte of $MNT/PREFIX-0 .. -(RUNS-1), never read before, vs an
# HTTP GET of each up to its first body byte; sets FIRST_US, BASE_US and REQ (see first_bytes).
ttfb_vs_http() {
    files_of "$1"
    first_bytes PATHS ttfb-http URLS
}

table_header
mount_fs "$MNT" || die "cannot mount"
say "mounted $BASE on $MNT (pid $FS_PID)"

# 1 and 2: cold and warm reads. First by id, with nothing listed: raw plus a summary read.
say "cold reads of u64m by id, folder not listed ($RUNS runs)"
cold_vs_curl u64m application/fhir+json
c=$COLD_US b=$CURL_US
row "cold read 64MiB by id, folder not listed: auto reads raw + summary (ms)" "$(ms "$c")" \
    "$(ms "$b") (curl JSON)" "$(ratio "$c" "$b")" "<= 1.5" "$(met "$(ratio "$c" "$b")" 1.5)" \
    "$REQ for $RUNS files"
cpu_row
curl_into_tmpfs u64m application/octet-stream
row "  the same against curl of the raw bytes into new tmpfs files (ms)" "$(ms "$c")" \
    "$(ms "$STORE_US") (curl raw > tmpfs)" "$(ratio "$c" "$STORE_US")" - - -

# The first byte of a 1 KiB file by id: the raw answer, then its summary read.
ttfb_vs_http u1k
c=$FIRST_US h=$BASE_US
row "first byte 1 KiB by id, folder not listed: raw + summary (µs)" "$c" \
    "$h (HTTP GET, new connection)" "$(ratio "$c" "$h")" - - "$REQ for $RUNS files"

# A plain `ls`: readdir only. The listing gives every file's type, so auto reads raw.
ls "$MNT" >/dev/null
declare -A COLD CURL COLD_REQ
for size in 1m 10m 64m; do
    say "cold reads of c$size ($RUNS runs)"
    cold_vs_curl "c$size" application/fhir+json
    COLD[$size]=$COLD_US CURL[$size]=$CURL_US COLD_REQ[$size]=$REQ
done
# CPU_FILE and CPU_BUSY are the 64 MiB reads' from here on.
for size in 1m 10m 64m; do
    target=- ok=-
    if [[ $size == 64m ]]; then
        target="<= 1.5"
        ok=$(met "$(ratio "${COLD[$size]}" "${CURL[$size]}")" 1.5)
    fi
    row "cold read ${size^^}iB, folder listed: auto reads raw (ms)" "$(ms "${COLD[$size]}")" "$(ms "${CURL[$size]}") (curl JSON)" \
        "$(ratio "${COLD[$size]}" "${CURL[$size]}")" "$target" "$ok" "${COLD_REQ[$size]} for $RUNS files"
done

# The same 64 MiB against curl of the raw bytes (64 MiB instead of the JSON's 85).
raws=()
for ((i = 0; i < RUNS; i++)); do
    time_us curl -fsS -H 'Accept: application/octet-stream' "$BASE/Binary/c64m-$i" -o /dev/null
    raws+=("$ELAPSED")
done
r=$(median "${raws[@]}")
row "  the same 64MiB against curl of the raw bytes (ms)" "$(ms "${COLD[64m]}")" "$(ms "$r") (curl raw)" \
    "$(ratio "${COLD[64m]}" "$r")" - - -
cpu_row

# Streaming: the first byte of a cold 64 MiB file comes with the first bytes of its body, not
# after the last (open + read of 1 byte, timed in-process, vs an HTTP GET to its first body
# byte). The rest of each body is then read (untimed), so no download runs on into the next.
say "first byte of cold 64 MiB files ($RUNS runs)"
files_of s64m
stats_reset
first=()
for p in "${PATHS[@]}"; do
    # One at a time: a body still arriving would slow the next file's first byte.
    first+=("$(python3 "$HELPER" ttfb "$p")")
    cat "$p" >/dev/null
done
req=$(stats)
mapfile -t http < <(python3 "$HELPER" ttfb-http "${URLS[@]}")
f=$(median "${first[@]}") h=$(median "${http[@]}")
row "  first byte of a cold 64MiB, folder listed (µs)" "$f" "$h (HTTP GET, new connection)" \
    "$(ratio "$f" "$h")" - - "$req for $RUNS files"

# Every cold-read file against its own tmpfs copy: where the kernel placed a file's pages moves
# its read time by up to half on this VM (two tmpfs copies of the same 64 MiB read in 9 and
# 14 ms), so one file per side would measure placement more than the filesystem.
for size in 1m 10m 64m; do
    for ((i = 0; i < RUNS; i++)); do
        curl -fsS -H 'Accept: application/octet-stream' "$BASE/Binary/c$size-$i" -o "$SHM/c$size-$i"
        cmp "$MNT/c$size-$i" "$SHM/c$size-$i" ||
            die "c$size-$i read through the mount differs from the server's bytes"
    done
done
for size in 1m 10m 64m; do
    say "warm reads of c$size-0..$((RUNS - 1)) ($((RUNS * 4)) runs)"
    warm=() shm=()
    stats_reset
    for ((i = 0; i < RUNS * 4; i++)); do
        time_us cat "$MNT/c$size-$((i % RUNS))"
        warm+=("$ELAPSED")
        time_us cat "$SHM/c$size-$((i % RUNS))"
        shm+=("$ELAPSED")
    done
    w=$(median "${warm[@]}") s=$(median "${shm[@]}")
    row "warm read ${size^^}iB (ms)" "$(ms "$w")" "$(ms "$s") (tmpfs)" "$(ratio "$w" "$s")" \
        "<= 1.2" "$(met "$(ratio "$w" "$s")" 1.2)" "$(stats)"
done

# 3: time to first byte of 1 KiB files.
say "time to first byte, 1 KiB"
ttfb_vs_http t1k
c=$FIRST_US h=$BASE_US
row "first byte 1 KiB, cold (µs)" "$c" "$h (HTTP GET, new connection)" \
    "$(ratio "$c" "$h")" - - "$REQ for $RUNS files"
head -c 1024 "$MNT/t1k-0" >"$SHM/t1k"
mnt_paths=() shm_paths=()
for ((i = 0; i < RUNS * 4; i++)); do
    mnt_paths+=("$MNT/t1k-0")
    shm_paths+=("$SHM/t1k")
done
first_bytes mnt_paths ttfb shm_paths
w=$FIRST_US s=$BASE_US
row "first byte 1 KiB, warm (µs)" "$w" "$s (tmpfs)" "$(ratio "$w" "$s")" \
    "< 1000 µs" "$(met "$w" 999)" "$REQ"

# 4: six parallel reads of files delayed 2 s each.
say "six parallel reads of 2 s-delayed files"
stats_reset
start=$(now_us) pids=()
for i in 0 1 2 3 4 5; do
    timeout 60 cat "$MNT/slow-$i" >/dev/null &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || die "a parallel read failed"; done
par=$(($(now_us) - start))
req=$(stats)
start=$(now_us) pids=()
for i in 0 1 2 3 4 5; do
    curl -fsS -m 60 -H 'Accept: application/fhir+json' "$BASE/Binary/slow-$i" -o /dev/null &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || die "a parallel curl failed"; done
base=$(($(now_us) - start))
row "6 parallel reads, 2 s delay each (s)" "$(ratio "$par" 1000000)" \
    "$(ratio "$base" 1000000) (6 parallel curls)" "$(ratio "$par" "$base")" "about 2 s" \
    "$(met "$(ratio "$par" 1000000)" 3)" "$req"

# 5: eight concurrent opens of one cold id.
say "eight concurrent reads of one cold id"
stats_reset
pids=()
for i in 1 2 3 4 5 6 7 8; do
    timeout 60 cat "$MNT/herd" >/dev/null &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || die "a concurrent read failed"; done
req=$(stats)
gets=$(($(count json "$req") + $(count raw "$req")))
row "8 concurrent opens of one cold id (GETs)" "$gets" "1 (expected)" "$(ratio "$gets" 1)" \
    "1 GET" "$(met "$gets" 1)" "$req"
unmount_fs

# 6: peak RSS through a 256 MiB cache, FHIR JSON (--fetch json) and after a listing (raw).
for how in json raw; do
    say "peak RSS while reading 32 x 64 MiB through --cache-size 256MiB ($how)"
    opts=(--cache-size 256MiB)
    if [[ $how == json && -n $HAS_FETCH ]]; then opts+=(--fetch json); fi
    mount_fs "$MNT" "${opts[@]}" || die "cannot mount"
    if [[ $how == raw ]]; then ls "$MNT" >/dev/null; fi
    idle=$(awk '/^VmHWM/{ print $2 }' "/proc/$FS_PID/status")
    stats_reset
    start=$(now_us)
    for i in $(seq 0 31); do cat "$MNT/r64m-$i" >/dev/null; done
    took=$(($(now_us) - start))
    req=$(stats)
    hwm=$(awk '/^VmHWM/{ print $2 }' "/proc/$FS_PID/status")
    rss=$(awk '/^VmRSS/{ print $2 }' "/proc/$FS_PID/status")
    limit=$(((256 + 64) * 1024))
    row "peak RSS reading 2 GiB, 256 MiB cache, $how (MiB)" "$((hwm / 1024)) (idle $((idle / 1024)), after $((rss / 1024)))" \
        "$((limit / 1024)) (cache + 64 MiB)" "$(ratio "$hwm" "$limit")" "<= 320 MiB" "$(met "$hwm" "$limit")" \
        "$req; $(awk -v us="$took" 'BEGIN { printf "%.0f MiB/s", 2048 / (us / 1e6) }')"
    unmount_fs
done

# 7: --fetch json / raw, when the daemon has the option.
if [[ -n $HAS_FETCH ]]; then
    for mode in json raw; do
        say "cold reads of 64 MiB with --fetch $mode"
        prefix=f${mode:0:1}64m
        accept=application/fhir+json
        if [[ $mode == raw ]]; then accept=application/octet-stream; fi
        if ! mount_fs "$MNT" --fetch "$mode"; then
            row "cold read 64MiB, --fetch $mode (ms)" "mount failed" - - - - -
            continue
        fi
        cold_vs_curl "$prefix" "$accept"
        c=$COLD_US b=$CURL_US
        row "cold read 64MiB, --fetch $mode (ms)" "$(ms "$c")" "$(ms "$b") (curl $mode)" \
            "$(ratio "$c" "$b")" "<= 1.5" "$(met "$(ratio "$c" "$b")" 1.5)" "$REQ for $RUNS files"
        cpu_row
        curl_into_tmpfs "$prefix" "$accept"
        row "  the same against curl $mode into new tmpfs files (ms)" "$(ms "$c")" \
            "$(ms "$STORE_US") (curl $mode > tmpfs)" "$(ratio "$c" "$STORE_US")" - - -
        unmount_fs
    done
else
    row "--fetch json / raw" "skipped" - - - - "this fhirfs --help has no --fetch"
fi

print_table "bench/run.sh (RUNS=$RUNS)"
