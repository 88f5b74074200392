#!/usr/bin/env python3
"""Small timing and plumbing helpers for bench/run.sh and bench/backup.sh (stdlib only).

  notify-wait SOCKET TIMEOUT PIDFILE  bind a datagram socket, wait for READY=1 on it; give up
                                      after TIMEOUT s or when the pid in PIDFILE has exited
  ttfb PATH...                        per path: microseconds for open + read of 1 byte
  ttfb-http URL...                    per URL: microseconds from connect to the first body byte
                                      (new connection each, Accept: application/fhir+json)
  median                              median of the numbers on stdin
  stats URL                           the bench server's /stats as `key=value` words
  stats-value URL KEY                 one number of the bench server's /stats (0 if absent)
  search-page FILE NEXTFILE           the ids of a searchset Bundle in FILE, one a line; writes
                                      its `next` link (or nothing) to NEXTFILE
  walk-pages URL                      pages through a search on one connection: microseconds,
                                      pages, Binary entries
  first-entry DIR                     microseconds to DIR's first entry and to its end, entries
  first-page URL                      microseconds to read the first page of a search whole, on
                                      a new connection
"""

import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.parse
import urllib.request


def alive(pid):
    """True when pid runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def notify_wait(path, timeout, pidfile):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    deadline = time.monotonic() + float(timeout)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096).decode(errors="replace")
            if "READY=1" in data.splitlines():
                return 0
        except socket.timeout:
            pass
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            if not alive(pid):
                print("the daemon exited before READY=1", file=sys.stderr)
                return 2
        except (OSError, ValueError):
            pass
    print(f"no READY=1 within {timeout} s", file=sys.stderr)
    return 1


def ttfb(paths):
    for path in paths:
        start = time.perf_counter_ns()
        fd = os.open(path, os.O_RDONLY)
        first = os.read(fd, 1)
        end = time.perf_counter_ns()
        os.close(fd)
        if len(first) != 1:
            print(f"{path}: empty read", file=sys.stderr)
            return 1
        print((end - start) // 1000)
    return 0


def ttfb_http(urls):
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        start = time.perf_counter_ns()
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("GET", parts.path, headers={"Accept": "application/fhir+json"})
        response = conn.getresponse()
        first = response.read(1)
        end = time.perf_counter_ns()
        conn.close()
        if response.status != 200 or len(first) != 1:
            print(f"{url}: status {response.status}", file=sys.stderr)
            return 1
        print((end - start) // 1000)
    return 0


def median():
    values = sorted(float(v) for v in sys.stdin.read().split())
    if not values:
        print("nan")
        return 1
    n = len(values)
    mid = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    print(f"{mid:.0f}")
    return 0


def stats(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        counts = json.load(response)
    names = [
        ("searches", "search"),
        ("json_reads", "json"),
        ("summary_reads", "summary"),
        ("raw_reads", "raw"),
        ("not_modified", "304"),
        ("heads", "head"),
        ("not_found", "404"),
        ("inflight_peak", "peak"),
    ]
    print(" ".join(f"{short}={counts.get(key, 0)}" for key, short in names))
    return 0


def stats_value(url, key):
    with urllib.request.urlopen(url, timeout=10) as response:
        print(json.load(response).get(key, 0))
    return 0


def search_page(path, next_path):
    with open(path) as f:
        bundle = json.load(f)
    for entry in bundle.get("entry", []):
        print(entry["resource"]["id"])
    links = bundle.get("link", [])
    following = next((link.get("url", "") for link in links if link.get("relation") == "next"), "")
    with open(next_path, "w") as f:
        f.write(following)
    return 0


def walk_pages(url):
    """Pages through a search as a minimal client would: one kept-alive connection, each body
    read whole, the next link found with a regular expression (no JSON parsing). Prints the
    elapsed microseconds, the pages and the Binary entries."""
    next_link = re.compile(rb'"relation"\s*:\s*"next"\s*,\s*"url"\s*:\s*"([^"]+)"')
    start = time.perf_counter()
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    pages = entries = 0
    target = parts.path + ("?" + parts.query if parts.query else "")
    while target:
        connection.request("GET", target, headers={"Accept": "application/fhir+json"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            print(f"page {pages + 1}: status {response.status}", file=sys.stderr)
            return 1
        pages += 1
        entries += body.count(b'"resourceType":"Binary"')
        found = next_link.search(body)
        target = ""
        if found:
            following = urllib.parse.urlsplit(found.group(1).decode())
            target = following.path + ("?" + following.query if following.query else "")
    elapsed = int((time.perf_counter() - start) * 1e6)
    print(elapsed, pages, entries)
    return 0


def first_page(url):
    """Microseconds from connecting to having the first page of a search whole (what a listing
    waits for before it can show anything)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    start = time.perf_counter()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("GET", target, headers={"Accept": "application/fhir+json"})
    response = connection.getresponse()
    body = response.read()
    elapsed = int((time.perf_counter() - start) * 1e6)
    connection.close()
    if response.status != 200 or not body:
        print(f"status {response.status}", file=sys.stderr)
        return 1
    print(elapsed)
    return 0


def first_entry(path):
    """Microseconds from opendir to the first entry that is not . or .., and to the end."""
    start = time.perf_counter()
    first = None
    count = 0
    with os.scandir(path) as entries:
        for _ in entries:
            if first is None:
                first = time.perf_counter()
            count += 1
    end = time.perf_counter()
    print(int(((first or end) - start) * 1e6), int((end - start) * 1e6), count)
    return 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    command, args = argv[1], argv[2:]
    if command == "notify-wait" and len(args) == 3:
        return notify_wait(*args)
    if command == "ttfb" and args:
        return ttfb(args)
    if command == "ttfb-http" and args:
        return ttfb_http(args)
    if command == "median" and not args:
        return median()
    if command == "stats" and len(args) == 1:
        return stats(args[0])
    if command == "walk-pages" and len(args) == 1:
        return walk_pages(args[0])
    if command == "first-entry" and len(args) == 1:
        return first_entry(args[0])
    if command == "first-page" and len(args) == 1:
        return first_page(args[0])
    if command == "stats-value" and len(args) == 2:
        return stats_value(*args)
    if command == "search-page" and len(args) == 2:
        return search_page(*args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
