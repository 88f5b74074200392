# shellcheck shell=bash
# Shared by bench/run.sh and bench/backup.sh (sourced, not run): building, the bench server,
# mounting and unmounting fhirfs, timing, and the results table. Every wait is bounded, and an
# EXIT trap unmounts and stops whatever was started.

set -euo pipefail
export LC_ALL=C

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
# FHIRFS may name another build of the daemon (e.g. to compare branches); it is not rebuilt.
FHIRFS=${FHIRFS:-$REPO/target/release/fhirfs}
SERVER=$REPO/target/release/bench_server
HELPER=$BENCH_DIR/helper.py
# How long a server or a mount may take to come up, or a daemon to exit, in seconds.
PATIENCE=${PATIENCE:-30}

WORK=$(mktemp -d /tmp/fhirfs-bench.XXXXXX)
SHM=$(mktemp -d /dev/shm/fhirfs-bench.XXXXXX)
RESULTS=$WORK/results.md
SERVER_PIDS=()
MOUNTS=()
FS_PID=
FS_MNT=

load() { cut -d' ' -f1-3 /proc/loadavg; }
LOAD_START=$(load)

say() { printf '%s\n' "$*" >&2; }
die() {
    say "bench: $*"
    exit 1
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $FS_PID ]]; then
        kill -TERM "$FS_PID" 2>/dev/null || true
        wait_exit "$FS_PID" 10 || kill -KILL "$FS_PID" 2>/dev/null || true
    fi
    local m
    for m in "${MOUNTS[@]}"; do
        if is_mounted "$m"; then umount -l "$m" 2>/dev/null || true; fi
    done
    local p
    for p in "${SERVER_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    rm -rf "$SHM"
    if ((status != 0)) && [[ -f $WORK/fhirfs.log ]]; then
        say "--- last lines of the fhirfs log ($WORK/fhirfs.log) ---"
        tail -n 20 "$WORK/fhirfs.log" >&2 || true
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

require_root_and_fuse() {
    ((EUID == 0)) || die "run as root (it mounts)"
    [[ -e /dev/fuse ]] || die "/dev/fuse is missing"
    command -v python3 >/dev/null || die "python3 is needed for the helpers"
    command -v curl >/dev/null || die "curl is needed"
}

build() {
    say "building (cargo build --release, and the bench server, testserver/src/bin/bench_server.rs)"
    (cd "$REPO" && cargo build --release --quiet && cargo build --release --quiet -p fhirfs-testserver --bin bench_server)
}

is_mounted() {
    local path
    path=$(realpath -m "$1")
    awk -v p="$path" '$2 == p { found = 1 } END { exit !found }' /proc/self/mounts
}

# True while pid $1 runs (a zombie does not count).
alive() {
    local state
    [[ -r /proc/$1/stat ]] || return 1
    state=$(awk '{ sub(/.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

# Waits up to $2 seconds for pid $1 to exit, then reaps it. Fails if it is still running.
wait_exit() {
    local pid=$1 deadline=$((SECONDS + $2))
    while alive "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
    wait "$pid" 2>/dev/null || true
}

# start_server ARGS...: starts the bench server; sets SERVER_PID, BASE and STATS.
start_server() {
    local out=$WORK/server.out
    : >"$out"
    "$SERVER" "$@" >"$out" 2>>"$WORK/server.log" &
    SERVER_PID=$!
    SERVER_PIDS+=("$SERVER_PID")
    local deadline=$((SECONDS + PATIENCE)) port=
    until port=$(awk '/^READY /{ print $2 }' "$out") && [[ -n $port ]]; do
        alive "$SERVER_PID" || die "the bench server exited: $(tail -n 3 "$WORK/server.log")"
        ((SECONDS < deadline)) || die "the bench server did not start within $PATIENCE s"
        sleep 0.05
    done
    BASE=http://127.0.0.1:$port/fhir
    STATS=http://127.0.0.1:$port/stats
    say "$(tail -n 1 "$WORK/server.log")"
}

stop_server() {
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait_exit "$SERVER_PID" 10 || kill -KILL "$SERVER_PID" 2>/dev/null || true
}

# mount_fs MOUNTPOINT [fhirfs options...]: mounts $BASE there and waits for READY=1; fails
# (with the daemon stopped) when it does not come up.
mount_fs() {
    local mnt=$1
    shift
    mkdir -p "$mnt"
    MOUNTS+=("$mnt")
    local sock=$WORK/notify.sock pidfile=$WORK/fhirfs.pid
    rm -f "$sock" "$pidfile"
    python3 "$HELPER" notify-wait "$sock" "$PATIENCE" "$pidfile" &
    local waiter=$! deadline=$((SECONDS + 10))
    until [[ -S $sock ]]; do
        ((SECONDS < deadline)) || die "the readiness listener did not start"
        sleep 0.01
    done
    echo "=== mount $* $BASE $mnt" >>"$WORK/fhirfs.log"
    NOTIFY_SOCKET=$sock "$FHIRFS" "$@" "$BASE" "$mnt" 2>>"$WORK/fhirfs.log" &
    FS_PID=$!
    FS_MNT=$mnt
    echo "$FS_PID" >"$pidfile"
    if ! wait "$waiter"; then
        say "fhirfs did not become ready: $(tail -n 3 "$WORK/fhirfs.log")"
        unmount_fs
        return 1
    fi
}

# unmount_fs: SIGTERM, then wait (bounded) for the daemon to unmount and exit.
unmount_fs() {
    [[ -n $FS_PID ]] || return 0
    kill -TERM "$FS_PID" 2>/dev/null || true
    if ! wait_exit "$FS_PID" "$PATIENCE"; then
        say "fhirfs did not exit within $PATIENCE s after SIGTERM; killing it"
        kill -KILL "$FS_PID" 2>/dev/null || true
    fi
    if is_mounted "$FS_MNT"; then umount -l "$FS_MNT" || true; fi
    FS_PID=
}

# Microseconds since the epoch, without a fork.
now_us() {
    local t=$EPOCHREALTIME
    echo "${t/./}"
}

# time_us CMD...: runs CMD (stdout to /dev/null) and sets ELAPSED to its wall time in µs;
# returns CMD's status (so that `if time_us timeout ...` sees a failure or a timeout).
time_us() {
    local start=$EPOCHREALTIME status=0
    "$@" >/dev/null || status=$?
    local end=$EPOCHREALTIME
    ELAPSED=$((${end/./} - ${start/./}))
    return "$status"
}

median() { printf '%s\n' "$@" | python3 "$HELPER" median; }

# cpu_ms PID: the CPU time (user + system) PID has used so far, in ms.
cpu_ms() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) * 1000 / hz }' "/proc/$1/stat"
}

# children_ms: sets CHILDREN_MS to the CPU time (user + system) this shell's finished children
# have used, in ms. Not for $(...): a subshell's children are not this shell's.
children_ms() {
    times >"$WORK/times"
    CHILDREN_MS=$(awk 'NR == 2 {
        for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); total += t[1] * 60000 + t[2] * 1000 }
        print total
    }' "$WORK/times")
}

stats_reset() { curl -fsS -X POST "$STATS/reset" >/dev/null; }
stats() { python3 "$HELPER" stats "$STATS"; }
# count KEY "key=value ...": the value of KEY.
count() { tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k { print $2 }'; }

# ms MICROSECONDS: milliseconds with two decimals.
ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }

table_header() {
    {
        echo "| measurement | fhirfs | baseline | ratio | target | met | server requests |"
        echo "|---|---|---|---|---|---|---|"
    } >"$RESULTS"
}

# row NAME FHIRFS BASELINE RATIO TARGET MET REQUESTS: prints one result and keeps it for the table.
row() {
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$@" | tee -a "$RESULTS"
}

# met RATIO-OR-VALUE LIMIT: "yes" when the first is at most the second.
met() { awk -v v="$1" -v l="$2" 'BEGIN { print ((v + 0 <= l + 0) ? "yes" : "**no**") }'; }

print_table() {
    echo
    echo "## $1"
    echo
    echo "$(uname -sr), $(nproc) cores, fhirfs $(git -C "$REPO" rev-parse --short HEAD)," \
        "$(date -u +%Y-%m-%dT%H:%MZ), load average at start $LOAD_START, at end $(load)"
    echo
    cat "$RESULTS"
}

# list_ids BASE OUT HELPER: the id of every Binary, one a line, into OUT: one curl per search
# page, following `next` links.
list_ids() {
    local url="$1/Binary?_count=1000&_elements=id" out=$2 helper=$3 page=$2.page
    : >"$out"
    while [[ -n $url ]]; do
        curl -fsS -H 'Accept: application/fhir+json' -o "$page" "$url" || return 1
        python3 "$helper" search-page "$page" "$page.next" >>"$out" || return 1
        url=$(<"$page.next")
    done
    rm -f "$page" "$page.next"
}

