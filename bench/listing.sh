#!/usr/bin/env bash
# Listing a large server (issue 15): `ls` of N Binaries through the mount, next to a client
# that only pages through the same search.
#
# Usage (as root, it mounts; needs /dev/fuse, curl and python3):
#   bench/listing.sh                      # N = 100000 and 1000000, RUNS=3: about 3 minutes
#   SIZES=100000 RUNS=5 bench/listing.sh
#   SIZES=1000000 RUNS=1 LS_L=0 bench/listing.sh   # without the slow `ls -l` part
#
# For each N, a bench server with N Binaries of 100 bytes, pages of at most 1000, and fhirfs
# with --page-size 1000, each run on a fresh mount:
# - baseline: bench/helper.py walk-pages, one kept-alive connection paging through
#   `Binary?_count=1000&_elements=id,meta,contentType` (bodies read whole, next links found
#   with a regular expression): the server's own time to page through the listing;
# - cold `ls -f MNT | wc -l` (the first listing), and the time to its first entry (scandir);
#   target: cold <= baseline + 20 %; the first entry against one page of the baseline (its time
#   over its pages), target <= 1, and against the first page alone as a plain client reads it
#   on a new connection (bench/helper.py first-page), what a listing waits for at least;
# - warm `ls -f` (within --dir-ttl); target <= 2 s at 1M;
# - fhirfs's RSS after the listing and its peak (VmHWM), and RSS per Binary; target <= 250 B;
# - a refresh after 10 changes: on a fresh mount with --dir-ttl 1, after its first listing, the
#   bench server makes a new version of 10 Binaries (POST /admin/touch), and an `ls -f` past
#   the TTL refreshes the listing: the requests it made (the bench server's /stats before and
#   after; fhirfs asks Binary/_history?_since= first, see README "Refreshing the listing"),
#   target <= 3; its time; and checks that it still lists N entries and that a touched file
#   shows its new user.fhir.versionId. The Binaries' version 1 is an hour old
#   (--created-ago 3600), as on a real server: fhirfs asks for changes since 2 minutes before
#   its listing, and Binaries made after that would all be changes;
# - `ls -l` with sizes in the listing (a server that sends `data` in searches): cold and warm;
#   LS_L=0 skips it.
# Every figure is the median of RUNS runs, with the range.

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SIZES=${SIZES:-100000 1000000}
RUNS=${RUNS:-3}
LS_L=${LS_L:-1}
# How long a listing is trusted on the refresh mount (--dir-ttl), and how long after the
# touches its `ls -f` waits: past the TTL, counted from when the listing or refresh began.
REFRESH_TTL=1
REFRESH_WAIT=1.5

require_root_and_fuse
build

# spread UNIT VALUES...: "median (min–max)" of microsecond values, in seconds (UNIT s) or
# milliseconds (UNIT ms).
spread() {
    local unit=$1 med min max
    shift
    med=$(median "$@")
    min=$(printf '%s\n' "$@" | sort -n | head -n 1)
    max=$(printf '%s\n' "$@" | sort -n | tail -n 1)
    awk -v u="$unit" -v a="$med" -v b="$min" -v c="$max" 'BEGIN {
        if (u == "ms") printf "%.1f ms (%.1f–%.1f)", a / 1e3, b / 1e3, c / 1e3
        else printf "%.2f s (%.2f–%.2f)", a / 1e6, b / 1e6, c / 1e6
    }'
}
range() { spread s "$@"; }
range_ms() { spread ms "$@"; }

# timed_ls OPTION LINES WHAT: times `ls OPTION MNT | wc -l` into ELAPSED, and dies unless it
# printed LINES lines (WHAT names the listing in the message).
timed_ls() {
    time_us bash -c "ls $1 '$WORK/mnt' | wc -l >'$WORK/count'"
    (($(<"$WORK/count") == $2)) || die "$3 gave $(<"$WORK/count") lines, not $2"
}

rss_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# counts: "REQUESTS HISTORY SEARCHES" the bench server has answered so far: every FHIR request,
# the Binary/_history pages, the search pages (of any kind: listing, _lastUpdated, count).
counts() {
    curl -fsS "$STATS" | python3 -c 'import json, sys; s = json.load(sys.stdin); print(s["requests"], s["history"], s["searches"])'
}

# touched_file JSON: "ID VERSION" of the last Binary an /admin/touch answer names.
touched_file() {
    python3 -c 'import json, sys; t = json.load(open(sys.argv[1]))["touched"][-1]; print(t["id"], t["versionId"])' "$1"
}

# version_of FILE: its user.fhir.versionId.
version_of() {
    python3 -c 'import os, sys; print(os.getxattr(sys.argv[1], "user.fhir.versionId").decode())' "$1"
}

{
    echo "| N | measurement | fhirfs | baseline | ratio | target | met |"
    echo "|---|---|---|---|---|---|---|"
} >"$RESULTS"
line() { printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$@" | tee -a "$RESULTS"; }

for n in $SIZES; do
    start_server --files "$n" --size 100 --page-cap 1000 --created-ago 3600
    walks=() colds=() firsts=() firsts_page=() warms=() rss=() peaks=()
    for ((run = 1; run <= RUNS; run++)); do
        read -r us pages entries < <(python3 "$HELPER" walk-pages "$BASE/Binary?_count=1000&_elements=id,meta,contentType")
        ((entries == n)) || die "the baseline saw $entries entries, not $n"
        walks+=("$us")
        mount_fs "$WORK/mnt" --page-size 1000 --log-level warn
        timed_ls -f $((n + 2)) "cold ls -f"
        colds+=("$ELAPSED")
        timed_ls -f $((n + 2)) "warm ls -f"
        warms+=("$ELAPSED")
        rss+=("$(rss_kb "$FS_PID" VmRSS)")
        peaks+=("$(rss_kb "$FS_PID" VmHWM)")
        unmount_fs
        # The first page alone, as a plain client reads it on a new connection; then the first
        # entry, on a fresh mount (the first listing).
        firsts_page+=("$(python3 "$HELPER" first-page "$BASE/Binary?_count=1000&_elements=id,meta,contentType")")
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
    line "$n" "first entry" "$(range_ms "${firsts[@]}")" "$(awk -v u="$page_us" 'BEGIN { printf "%.1f ms (one page of the walk)", u / 1e3 }')" \
        "$(ratio "$first" "$page_us")" "<= 1.00" "$(met "$(ratio "$first" "$page_us")" 1.00)"
    first_page=$(median "${firsts_page[@]}")
    line "$n" "first entry, against the first page alone" "$(range_ms "${firsts[@]}")" \
        "$(range_ms "${firsts_page[@]}") (the first page, new connection)" "$(ratio "$first" "$first_page")" "-" "-"
    warm=$(median "${warms[@]}")
    line "$n" "warm \`ls -f\`" "$(range "${warms[@]}")" "-" "-" "<= 2 s" "$(met "$(awk -v w="$warm" 'BEGIN { print w / 1e6 }')" 2)"
    r=$(median "${rss[@]}")
    p=$(median "${peaks[@]}")
    per=$(awk -v r="$r" -v n="$n" 'BEGIN { printf "%d", r * 1024 / n }')
    line "$n" "RSS after the listing (peak)" "$((r / 1024)) MiB ($((p / 1024)) MiB)" "-" "-" "-" "-"
    line "$n" "RSS per Binary" "$per B" "-" "-" "<= 250 B" "$(met "$per" 250)"

    # A refresh after 10 changes, RUNS times on one mount (each run's history also holds the
    # runs before it that are within fhirfs's 2-minute margin: still one page).
    mount_fs "$WORK/mnt" --page-size 1000 --dir-ttl "$REFRESH_TTL" --log-level debug
    ls -f "$WORK/mnt" | wc -l >"$WORK/count"
    (($(<"$WORK/count") == n + 2)) || die "the refresh mount's listing gave $(<"$WORK/count") entries, not $((n + 2))"
    refreshes=() refresh_requests=() history_pages=() search_pages=()
    for ((run = 1; run <= RUNS; run++)); do
        curl -fsS -X POST "${BASE%/fhir}/admin/touch?n=10" >"$WORK/touched.json"
        sleep "$REFRESH_WAIT"
        read -r requests0 history0 searches0 < <(counts)
        timed_ls -f $((n + 2)) "the refreshed ls -f"
        refreshes+=("$ELAPSED")
        read -r requests1 history1 searches1 < <(counts)
        refresh_requests+=($((requests1 - requests0)))
        history_pages+=($((history1 - history0)))
        search_pages+=($((searches1 - searches0)))
        read -r id version < <(touched_file "$WORK/touched.json")
        got=$(version_of "$WORK/mnt/$id")
        [[ $got == "$version" ]] || die "$id shows version $got after the refresh, not $version"
    done
    # What fhirfs did, by its debug log: each refresh's changes, and any fallback.
    grep -E 'refreshed the listing|what changed|shows deletions' "$WORK/fhirfs.log" | sed 's/^/fhirfs: /' >&2 || true
    unmount_fs
    most=$(printf '%s\n' "${refresh_requests[@]}" | sort -n | tail -n 1)
    line "$n" "refresh after 10 changes: requests" \
        "$most (per run: ${refresh_requests[*]}; _history pages: ${history_pages[*]}; searches: ${search_pages[*]})" \
        "-" "-" "<= 3" "$(met "$most" 3)"
    line "$n" "refresh \`ls -f\` time" "$(range "${refreshes[@]}")" "$(range "${warms[@]}") (warm \`ls -f\`)" \
        "$(ratio "$(median "${refreshes[@]}")" "$warm")" "-" "-"
    stop_server
    ((LS_L)) || continue

    # `ls -l` with sizes in the listing: a server that sends `data` in searches.
    start_server --files "$n" --size 100 --page-cap 1000 --listing-data
    cold_l=() warm_l=()
    for ((run = 1; run <= RUNS; run++)); do
        mount_fs "$WORK/mnt" --page-size 1000 --log-level warn
        timed_ls -l $((n + 1)) "cold ls -l"
        cold_l+=("$ELAPSED")
        time_us bash -c "ls -l '$WORK/mnt' >/dev/null"
        warm_l+=("$ELAPSED")
        unmount_fs
    done
    line "$n" "\`ls -l\`, sizes listed: cold" "$(range "${cold_l[@]}")" "-" "-" "-" "-"
    line "$n" "\`ls -l\`, sizes listed: warm" "$(range "${warm_l[@]}")" "-" "-" "-" "-"
    stop_server
done

print_table "Listing N Binaries (bench/listing.sh, RUNS=$RUNS)"
