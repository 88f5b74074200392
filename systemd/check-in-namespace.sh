#!/usr/bin/env bash
# Runs systemd/fhirfs@.service, unchanged, under a real systemd, and checks what no test of the
# unit file can: that the hardened service's mount is seen outside the service.
#
# systemd is booted as PID 1 of new pid, mount, network, UTS and cgroup namespaces, so the
# machine itself is not touched: /run, /etc and /usr/bin are private (tmpfs or
# overlays), /proc/sys and /sys are read-only, the network is a private loopback, and
# systemd's cgroups live in one child cgroup that is removed at the end. A small FHIR server
# (python3) answers inside that network.
#
# Checks: the service starts (READY=1 once the mount answers); its mount is in systemd's own
# mount namespace, visible there with the files, readable by another user (--allow-other);
# the token arrives and FHIRFS_TOKEN from the .conf is not in the environment; only
# CAP_SYS_ADMIN, no_new_privs and a seccomp filter are in force; after kill -9 the dead
# mount is detached and the service restarts; stop unmounts with status 0. Then it shows
# why the unit has no ProtectSystem=: with ProtectSystem=strict + ReadWritePaths=, with or
# without MountFlags=shared, the service is "active" but outside it the folder is empty.
#
# Needs root, /dev/fuse, the systemd package (systemd need not be running), python3,
# util-linux (unshare, nsenter, findmnt), overlayfs and cgroup2. Takes about half a minute.
# Not run by CI (tests/systemd.rs is); run it after changing the unit:
#   cargo build && sudo systemd/check-in-namespace.sh [target/debug/fhirfs]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
binary=$(realpath "${1:-$here/../target/debug/fhirfs}")
fail() { echo "check-in-namespace: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || fail "needs root"
[ -x "$binary" ] || fail "no fhirfs binary at $binary (cargo build first, or pass its path)"
[ -c /dev/fuse ] || fail "needs /dev/fuse"
[ -x /lib/systemd/systemd ] || fail "needs the systemd package (apt-get install -y systemd)"
command -v python3 >/dev/null || fail "needs python3"
cgroot=$(findmnt -n -t cgroup2 -o TARGET | head -n 1)
[ -n "$cgroot" ] || fail "needs a cgroup2 hierarchy"

work=$(mktemp -d /tmp/fhirfs-check.XXXXXX)
chmod 0755 "$work"  # other users must reach the mountpoint inside it
cgroup="$cgroot/fhirfs-check.$$"
mkdir "$cgroup"
token="check-token-$$-$RANDOM"
pid1=""
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null
  [ -n "$pid1" ] && kill -9 "$pid1" 2>/dev/null
  sleep 1
  find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# --- the world systemd boots into ---
mkdir -p "$work/units" "$work/etc-upper/fhirfs" "$work/etc-upper/systemd/journald.conf.d" \
  "$work/etc-work" "$work/bin-upper" "$work/bin-work" "$work/mnt"
cp "$here/fhirfs@.service" "$work/units/"
for target in sysinit basic shutdown multi-user network network-online; do
  printf '[Unit]\nDefaultDependencies=no\n' > "$work/units/$target.target"
done
printf '[Unit]\nDefaultDependencies=no\nWants=systemd-journald.service\n' > "$work/units/check.target"
cp /lib/systemd/system/systemd-journald.socket /lib/systemd/system/systemd-journald-dev-log.socket \
  "$work/units/"
sed 's/^Sockets=.*/Sockets=systemd-journald.socket systemd-journald-dev-log.socket/' \
  /lib/systemd/system/systemd-journald.service > "$work/units/systemd-journald.service"
printf '[Journal]\nStorage=volatile\nReadKMsg=no\n' \
  > "$work/etc-upper/systemd/journald.conf.d/volatile.conf"
cat > "$work/etc-upper/fhirfs/check.conf" <<EOF
FHIRFS_URL=http://localhost:8765/fhir
FHIRFS_MOUNTPOINT=$work/mnt
FHIRFS_OPTIONS=--allow-other
FHIRFS_TOKEN=this-must-not-reach-fhirfs
EOF
printf '%s\n' "$token" > "$work/etc-upper/fhirfs/check.token"
chmod 0600 "$work/etc-upper/fhirfs/check.token"
cp "$binary" "$work/bin-upper/fhirfs"

cat > "$work/server.py" <<'EOF'
import base64, json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
FILES = {"hello": b"hello from fhir\n", "second": b"second file\n"}
class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        print(self.path, self.headers.get("Authorization"), file=sys.stderr, flush=True)
    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer " + sys.argv[1]:
            return self.reply(401, {"resourceType": "OperationOutcome"})
        path = self.path.split("?")[0]
        if path == "/fhir/Binary":
            return self.reply(200, {"resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": {"resourceType": "Binary", "id": k, "contentType": "text/plain"}}
                for k in FILES]})
        name = path.rsplit("/", 1)[-1]
        if path.startswith("/fhir/Binary/") and name in FILES:
            return self.reply(200, {"resourceType": "Binary", "id": name, "contentType":
                                    "text/plain", "data": base64.b64encode(FILES[name]).decode()})
        if path == "/fhir/metadata":
            return self.reply(200, {"resourceType": "CapabilityStatement"})
        return self.reply(404, {"resourceType": "OperationOutcome"})
ThreadingHTTPServer(("127.0.0.1", 8765), Handler).serve_forever()
EOF

cat > "$work/pid1.sh" <<EOF
#!/bin/bash
# PID 1 of the new namespaces: private mounts, then systemd.
set -e
# systemd's cgroups go below one child cgroup of the machine's (see unshare --cgroup below).
echo 0 > $cgroup/cgroup.procs
mount -t tmpfs -o mode=0755 tmpfs /run
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
mount --bind /sys /sys && mount -o remount,bind,ro /sys
mount --bind /dev/null /dev/console
mount -t overlay overlay -o lowerdir=/etc,upperdir=$work/etc-upper,workdir=$work/etc-work /etc
mount -t overlay overlay \
  -o lowerdir=/usr/bin,upperdir=$work/bin-upper,workdir=$work/bin-work /usr/bin
ip link set lo up 2>/dev/null || true
# As on a booted host (systemd leaves this to the container manager in a container).
mount --make-rshared /
export container=fhirfs-check SYSTEMD_UNIT_PATH=$work/units
exec unshare --cgroup sh -c 'mount -t cgroup2 none /sys/fs/cgroup && exec /lib/systemd/systemd --system --unit=check.target --log-target=journal'
EOF
chmod +x "$work/pid1.sh"

unshare --pid --fork --mount --uts --net --propagation private --mount-proc "$work/pid1.sh" \
  </dev/null >"$work/unshare.log" 2>&1 &
outer=$!
for _ in $(seq 50); do
  pid1=$(pgrep -P "$outer" || true)
  [ -n "$pid1" ] && [ "$(cat "/proc/$pid1/comm" 2>/dev/null)" = systemd ] && break
  sleep 0.2
done
[ "$(cat "/proc/$pid1/comm" 2>/dev/null)" = systemd ] || { cat "$work/unshare.log"; fail "systemd did not start"; }
in_ns() { nsenter -t "$pid1" -m -p -n -u "$@"; }
for _ in $(seq 50); do
  in_ns systemctl is-system-running >/dev/null 2>&1 && break
  sleep 0.2
done
nsenter -t "$pid1" -n python3 "$work/server.py" "$token" 2>"$work/server.log" &
server=$!
sleep 0.5

failures=0
check() {
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then echo "PASS $what"; else echo "FAIL $what"; failures=$((failures + 1)); fi
}
prop() { in_ns systemctl show -p "$1" --value fhirfs@check.service; }
main_pid() { prop MainPID; }
visible() { in_ns findmnt -n -t fuse "$work/mnt" | grep -q ' fhirfs:'; }
invisible() { ! visible && [ -z "$(in_ns ls -A "$work/mnt")" ]; }
nobody_reads() { [ "$(in_ns setpriv --reuid=65534 --regid=65534 --clear-groups cat "$work/mnt/$1")" = "$2" ]; }

in_ns systemctl start fhirfs@check.service || true
check "start returns once the mount answers (Type=notify)" test "$(prop ActiveState)" = active
pid=$(main_pid)  # as seen in the namespaces: /proc, kill and nsenter go through in_ns
check "the daemon runs in systemd's own mount namespace" \
  test "$(in_ns readlink "/proc/$pid/ns/mnt")" = "$(in_ns readlink /proc/1/ns/mnt)"
check "the mount is visible outside the service" visible
check "root reads a file" test "$(in_ns cat "$work/mnt/hello")" = "hello from fhir"
check "another user reads a file (--allow-other)" nobody_reads second "second file"
check "the token reached the server" grep -q "Bearer $token" "$work/server.log"
check "FHIRFS_TOKEN from the .conf is not in the environment" \
  in_ns sh -c "! tr '\0' '\n' < /proc/$pid/environ | grep -q '^FHIRFS_TOKEN='"
check "only CAP_SYS_ADMIN is left" in_ns grep -q '^CapBnd:[[:space:]]*0000000000200000$' "/proc/$pid/status"
check "no_new_privs is set" in_ns grep -q '^NoNewPrivs:[[:space:]]*1$' "/proc/$pid/status"
check "a seccomp filter is in force" in_ns grep -q '^Seccomp:[[:space:]]*2$' "/proc/$pid/status"

in_ns kill -9 "$pid"
sleep 1
check "after kill -9 the dead mount is detached" bash -c "! findmnt -N $pid1 -n '$work/mnt'"
sleep 11
check "and the service is restarted (RestartSec=10s)" test "$(prop NRestarts)" = 1
check "and the files are back" test "$(in_ns cat "$work/mnt/hello")" = "hello from fhir"

in_ns systemctl stop fhirfs@check.service
check "stop ends with status 0" test "$(prop ExecMainStatus)/$(prop Result)" = 0/success
check "stop unmounts" bash -c "! findmnt -N $pid1 -n '$work/mnt'"

# Why the unit has no ProtectSystem=: these drop-ins give the service its own namespace.
mkdir -p "$work/units/fhirfs@check.service.d"
for settings in 'ProtectSystem=strict\nReadWritePaths=%s' \
  'ProtectSystem=strict\nReadWritePaths=%s\nMountFlags=shared'; do
  # shellcheck disable=SC2059
  printf "[Service]\n$settings\n" "$work/mnt" > "$work/units/fhirfs@check.service.d/ns.conf"
  in_ns systemctl daemon-reload
  in_ns systemctl start fhirfs@check.service || true
  # shellcheck disable=SC2059
  label=$(printf "$settings" MOUNTPOINT | tr '\n' ' ')
  check "with ${label}: the service says active" test "$(prop ActiveState)" = active
  check "with ${label}: the daemon sees its files" \
    in_ns nsenter -t "$(main_pid)" -m test -e "$work/mnt/hello"
  check "with ${label}: outside the service the folder is empty" invisible
  in_ns systemctl stop fhirfs@check.service
done

echo "$failures failed"
if [ "$failures" -ne 0 ]; then
  in_ns journalctl --no-pager -u fhirfs@check.service | tail -n 40
  exit 1
fi
