#!/usr/bin/env bash
# Listing a large server (issue 15): `ls` of N Binaries through the mount, next to a client
# that only pages through the same search.
#
# Usage (as root, it mounts; needs /dev/fuse, curl and python3):
#   bench/listing.sh                      # N = 100000 and 1000000, RUNS=3: about 3 minutes
#   SIZES=100000 RUNS=5 bench/listing.sh
#
# For each N, a bench server with N Binaries of 100 bytes, pages of at most 1000, and fhirfs
# with --page-size 1000, each run on a fresh mount:
# - baseline: bench/helper.py walk-pages, one kept-alive connection paging through
#   `Binary?_count=1000&_elements=id,meta,contentType` (bodies read whole, next links found
#   with a regular expression): the server's own time to page through the listing;
# - cold `ls -f MNT | wc -l` (the first listing), and the time to its first entry (scandir);
#   target: cold <= baseline + 20 %;
# - warm `ls -f` (within --dir-ttl); target <= 2 s at 1M;
# - fhirfs's RSS after the listing and its peak (VmHWM), and RSS per Binary; target <= 250 B;
# - `ls -l` with sizes in the listing (a server that sends `data` in searches): cold and warm.
# Every figure is the median of RUNS runs, with the range.

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SIZES=${SIZES:-100000 1000000}
RUNS=${RUNS:-3}

require_root_and_fuse
build

# range VALUES...: "median (min–max)" of microsecond values, in seconds.
range() {
    local med min max
    med=$(median "$@")
    min=$(printf '%s\n' "$@" | sort -n | head -n 1)
    max=$(printf '%s\n' "$@" | sort -n | tail -n 1)
    awk -v a="$med" -v b="$min" -v c="$max" 'BEGIN { printf "%.2f s (%.2f–%.2f)", a / 1e6, b / 1e6, c / 1e6 }'
}

rss_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

{
    echo "| N | measurement | fhirfs | baseline | ratio | target | met |"
    echo "|---|---|---|---|---|---|---|"
} >"$RESULTS"
line() { printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$@" | tee -a "$RESULTS"; }

for n in $SIZES; do
    start_server --files "$n" --size 100 --page-cap 1000
    walks=() colds=() firsts=() warms=() rss=() peaks=()
    for ((run = 1; run <= RUNS; run++)); do
        read -r us pages entries < <(python3 "$HELPER" walk-pages "$BASE/Binary?_count=1000&_elements=id,meta,contentType")
        ((entries == n)) || die "the baseline saw $entries entries, not $n"
        walks+=("$us")
        mount_fs "$WORK/mnt" --page-size 1000 --log-level warn
        time_us bash -c "ls -f '$WORK/mnt' | wc -l >'$WORK/count'"
        colds+=("$ELAPSED")
        (($(<"$WORK/count") == n + 2)) || die "cold ls -f gave $(<"$WORK/count") entries, not $((n + 2))"
        time_us bash -c "ls -f '$WORK/mnt' | wc -l >'$WORK/count'"
        warms+=("$ELAPSED")
        rss+=("$(rss_kb "$FS_PID" VmRSS)")
        peaks+=("$(rss_kb "$FS_PID" VmHWM)")
        unmount_fs
        # The first entry, on a fresh mount (the first listing).
        mount_fs "$WORK/mnt" --page-size 1000 --log-level warn
        read -r first _ count < <(python3 "$HELPER" first-entry "$WORK/mnt")
        ((count == n)) || die "scandir gave $count entries, not $n"
        firsts+=("$first")
        unmount_fs
    done
    walk=$(median "${walks[@]}")
    cold=$(median "${colds[@]}")
    line "$n" "cold \`ls -f\`" "$(range "${colds[@]}")" "$(range "${walks[@]}") (paging, $pages pages)" \
        "$(ratio "$cold" "$walk")" "<= 1.20" "$(met "$(ratio "$cold" "$walk")" 1.20)"
    # One page of the baseline: its time divided by the pages.
    page_us=$((walk / pages))
    first=$(median "${firsts[@]}")
    line "$n" "first entry" "$(range "${firsts[@]}")" "$(awk -v u="$page_us" 'BEGIN { printf "%.3f s (one page)", u / 1e6 }')" \
        "$(ratio "$first" "$page_us")" "<= 1.00" "$(met "$(ratio "$first" "$page_us")" 1.00)"
    warm=$(median "${warms[@]}")
    line "$n" "warm \`ls -f\`" "$(range "${warms[@]}")" "-" "-" "<= 2 s" "$(met "$(awk -v w="$warm" 'BEGIN { print w / 1e6 }')" 2)"
    r=$(median "${rss[@]}")
    p=$(median "${peaks[@]}")
    per=$(awk -v r="$r" -v n="$n" 'BEGIN { printf "%d", r * 1024 / n }')
    line "$n" "RSS after the listing (peak)" "$((r / 1024)) MiB ($((p / 1024)) MiB)" "-" "-" "-" "-"
    line "$n" "RSS per Binary" "$per B" "-" "-" "<= 250 B" "$(met "$per" 250)"
    stop_server

    # `ls -l` with sizes in the listing: a server that sends `data` in searches.
    start_server --files "$n" --size 100 --page-cap 1000 --listing-data
    cold_l=() warm_l=()
    for ((run = 1; run <= RUNS; run++)); do
        mount_fs "$WORK/mnt" --page-size 1000 --log-level warn
        time_us bash -c "ls -l '$WORK/mnt' | wc -l >'$WORK/count'"
        cold_l+=("$ELAPSED")
        (($(<"$WORK/count") == n + 1)) || die "ls -l gave $(<"$WORK/count") lines, not $((n + 1))"
        time_us bash -c "ls -l '$WORK/mnt' >/dev/null"
        warm_l+=("$ELAPSED")
        unmount_fs
    done
    line "$n" "\`ls -l\`, sizes listed: cold" "$(range "${cold_l[@]}")" "-" "-" "-" "-"
    line "$n" "\`ls -l\`, sizes listed: warm" "$(range "${warm_l[@]}")" "-" "-" "-" "-"
    stop_server
done

print_table "Listing N Binaries (bench/listing.sh, RUNS=$RUNS)"
