#!/usr/bin/env bash
# A randomized soak (issue 19) in two phases, MINUTES (default 4) split 3:5 between them:
#
# 1. `vdisk serve` (below): one VIMG image takes random writes (aligned and not, up to 1 MiB),
#    write-zeroes, trims and flushes over NBD, and at random times the server is restarted (SIGTERM, or
#    kill -9 right after a flush), in a random cache mode (writeback or none), and internal snapshots are
#    taken, deleted and reverted to (server stopped; `vimg snapshot`). A flat reference copy in memory
#    follows every step. After every stop `vimg check` must pass (after kill -9, leaked clusters are
#    allowed: exit 3); at the end the disk and every snapshot left must read back exactly as the reference
#    says.
# 2. The bus (Tools/soak-bus.sh): a VIMG image, a clone, a RAM disk and a remote export plugged at once,
#    ext4 and fio writers on each, under online snapshots, unplug/replug, restarts and kill -9 of the
#    remote server and kill -9 of the bus; fsck, `vimg check` and every finished file verified.
#
#   Tools/soak.sh [MINUTES]          VDISK_SEED=N reruns a seed (both phases); BIN=DIR picks vdisk and vimg
#
# The seed is printed first, so a failure reruns with VDISK_SEED=<seed> (the bus phase also says how to
# rerun it alone). The first phase needs python3 with the libnbd bindings (Debian: python3-libnbd); the
# second needs root, /dev/fuse, /dev/loop-control and fio, and is skipped, with a line saying so, where
# root or the devices are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-4}
SEED=${VDISK_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
SERVE_MINUTES=$(awk -v m="$MINUTES" 'BEGIN { print m * 3 / 8 }')
BUS_MINUTES=$(awk -v m="$MINUTES" 'BEGIN { print m * 5 / 8 }')
if [ -z "${BIN:-}" ]; then  # the newest of the debug and release builds
    BIN=.build/debug
    [ .build/release/vdisk -nt .build/debug/vdisk ] && BIN=.build/release
fi
BIN=$(cd "$BIN" && pwd)
WORK=$(mktemp -d /var/tmp/vdisk-soak.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
echo "soak: seed $SEED, $MINUTES minutes: $SERVE_MINUTES of vdisk serve, then $BUS_MINUTES of the bus" \
    "(rerun with VDISK_SEED=$SEED Tools/soak.sh $MINUTES)"
/usr/bin/python3 - "$BIN" "$WORK" "$SEED" "$SERVE_MINUTES" <<'EOF'
import atexit, random, signal, subprocess, sys, time
import nbd

bin_dir, work, seed, minutes = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(seed)
SIZE = 64 << 20
image, sock = work + "/disk.vimg", work + "/nbd.sock"
vdisk, vimg = bin_dir + "/vdisk", bin_dir + "/vimg"
counts = {}

def step(name):
    counts[name] = counts.get(name, 0) + 1

def fail(message):
    print(f"soak: vdisk serve FAILED (seed {seed}): {message}", file=sys.stderr)
    sys.exit(1)

def run(args, ok=(0,)):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode not in ok:
        fail(f"{' '.join(args)} exited {r.returncode}: {r.stdout}{r.stderr}")
    return r

running = []  # the server process, killed on the way out whatever happens

@atexit.register
def kill_running():
    for proc in running:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

class Server:
    def __init__(self, extra=()):
        self.cache = rng.choice(["writeback", "none"])
        args = [vdisk, "serve", "--cache=" + self.cache, "--socket", sock, *extra, image]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(work + "/serve.err", "a"))
        running[:] = [self.proc]
        for _ in range(400):
            if self.proc.poll() is not None:
                fail(f"vdisk serve exited {self.proc.returncode}: {open(work + '/serve.err').read()[-500:]}")
            try:
                self.h = nbd.NBD()
                self.h.connect_unix(sock)
                return
            except nbd.Error:
                time.sleep(0.025)
        fail("vdisk serve did not answer")

    def stop(self, kill=False):
        self.h.shutdown()
        self.h = None
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        if self.proc.wait(timeout=60) not in ((-signal.SIGKILL,) if kill else (0,)):
            fail(f"vdisk serve exited {self.proc.returncode} on stop")

def random_range(limit=1 << 20):
    if rng.random() < 0.5:  # aligned to 4 KiB
        count = rng.randrange(1, limit // 4096 + 1) * 4096
        return rng.randrange(0, (SIZE - count) // 4096 + 1) * 4096, count
    count = rng.randrange(1, limit + 1)
    return rng.randrange(0, SIZE - count + 1), count

def compare(h, expected, what):
    for offset in range(0, SIZE, 4 << 20):
        got = h.pread(4 << 20, offset)
        if got != expected[offset:offset + (4 << 20)]:
            first = next(i for i in range(len(got)) if got[i] != expected[offset + i])
            fail(f"{what}: byte {offset + first} differs from the reference")

run([vimg, "create", image, str(SIZE)])
reference = bytearray(SIZE)
snapshots = {}  # name -> reference at that time
server = Server()
deadline = time.monotonic() + minutes * 60
while time.monotonic() < deadline:
    op = rng.random()
    h = server.h
    if op < 0.62:
        offset, count = random_range()
        data = rng.randbytes(count)
        h.pwrite(data, offset, nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
        reference[offset:offset + count] = data
        step("write")
    elif op < 0.72:
        offset, count = random_range(4 << 20)
        h.zero(count, offset, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
        reference[offset:offset + count] = bytes(count)
        step("zero")
    elif op < 0.80:
        # After a trim the bytes are whatever the server says (NBD leaves them unspecified); from then on
        # they must stay so.
        offset, count = random_range(4 << 20)
        h.trim(count, offset)
        reference[offset:offset + count] = h.pread(count, offset)
        step("trim")
    elif op < 0.92:
        h.flush()
        step("flush")
    elif op < 0.99:
        offset, count = random_range()
        if h.pread(count, offset) != reference[offset:offset + count]:
            fail(f"read of {count} bytes at {offset} differs from the reference")
        step("read")
    else:
        # Stop the server (kill -9 right after a flush, or SIGTERM), check, maybe snapshot, restart.
        kill = rng.random() < 0.3
        if kill:
            h.flush()
        server.stop(kill=kill)
        step("kill -9" if kill else "restart")
        # kill -9 may leak clusters (allocated, not yet referenced): allowed, then freed; never corruption.
        if run([vimg, "check", image], ok=(0, 3) if kill else (0,)).returncode == 3:
            run([vimg, "check", "-r", "leaks", image])
            step("leaks repaired")
        choice = rng.random()
        if choice < 0.4 and len(snapshots) < 4:
            name = f"s{counts.get('snapshot', 0)}"
            run([vimg, "snapshot", "-c", name, image])
            snapshots[name] = bytes(reference)
            step("snapshot")
        elif choice < 0.55 and snapshots:
            name = rng.choice(sorted(snapshots))
            run([vimg, "snapshot", "-d", name, image])
            del snapshots[name]
            step("snapshot delete")
        elif choice < 0.65 and snapshots:
            name = rng.choice(sorted(snapshots))
            run([vimg, "snapshot", "-a", name, image])
            reference = bytearray(snapshots[name])
            step("revert")
        run([vimg, "check", image])
        server = Server()
        step("cache=" + server.cache)

server.h.flush()
server.stop()
run([vimg, "check", image])
server = Server()
compare(server.h, reference, "the disk")
server.stop()
for name, expected in sorted(snapshots.items()):
    server = Server(["--snapshot", name])
    compare(server.h, expected, f"snapshot {name}")
    server.stop()
run([vimg, "check", image])
print("soak: vdisk serve passed;", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
EOF

rm -rf "$WORK"
trap - EXIT

if [ "$(id -u)" -ne 0 ] || [ ! -e /dev/fuse ] || [ ! -e /dev/loop-control ]; then
    echo "soak: the bus phase skipped: it needs root, /dev/fuse and /dev/loop-control"
    exit 0
fi
# exec: a timeout's SIGTERM then reaches a process that cleans up (unmounts...) before it exits, and the
# timeout waits for that.
export VDISK_SEED=$SEED BIN
exec Tools/soak-bus.sh "$BUS_MINUTES"
