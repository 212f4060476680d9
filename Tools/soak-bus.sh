#!/usr/bin/env bash
# A randomized soak of the bus (issue 19), as root, through the kernel: for MINUTES (default 2.5) four
# plugged disks, each with ext4 mounted on it, take fio writers that verify what they wrote (crc32c in
# every block, read back during and after each write phase), and at random times:
#   - `vdisk snapshot` of the VIMG disks (online, file systems frozen), and a snapshot plugged read-only
#     beside its live disk, fsck'd and verified;
#   - unplug and replug of a disk (umount or `unplug --force`), a snapshot deleted offline in between
#     (`vimg snapshot -d`: the CLI has no online delete), `vimg check`, fsck, every file verified;
#   - a restart (SIGTERM) or a kill -9 of the remote disk's `vdisk serve`, which the bus rides out;
#   - a kill -9 of the bus, then recovery: `umount -l`, `vdisk list` starts a bus that removes the dead
#     one's devices, `vimg check` (leaks allowed, then repaired), replug, journal replay, fsck, verify.
# The disks: a VIMG image, a clone of a base image that holds files of its own, a RAM disk, and a remote
# NBD export (`vdisk serve` of another VIMG image on a unix socket). What each event must leave:
#   - a write phase (a new file; fio with end_fsync) counts once fio exits 0, and from then on the file
#     must verify (every block's header and crc32c as fio reads it back, and the sha256 taken when it
#     finished, both read with O_DIRECT) until it is replaced;
#   - a snapshot holds the files finished before it was taken;
#   - a restart or kill -9 of the remote server loses nothing: the bus holds requests and writes again
#     what the dead server acknowledged but never flushed (docs/BUS.md), so the writers carry on unharmed;
#   - a kill -9 of the bus loses what was in flight: its writers fail, their files are dropped, the RAM
#     disk starts over empty; every file finished before the kill must verify, and after journal replay
#     fsck must find nothing.
# At the end everything is verified, unplugged, `vimg check`ed (exit 0), each image plugged again from
# its file and verified cold, each snapshot left verified, the base image found unchanged, and the bus
# stopped with nothing left behind.
#
#   Tools/soak-bus.sh [MINUTES]      VDISK_SEED=N reruns a seed; BIN=DIR picks vdisk and vimg
#
# The seed is printed first, and a failure prints the tail of the event log (every command), the bus's log
# and the server's, and keeps them. A rerun makes the same random choices (events, pauses, fio's
# parameters), though what the writers are doing when an event strikes depends on timing. Needs root,
# /dev/fuse, /dev/loop-control, fio and e2fsprogs. Whatever happens, the trap unmounts, unplugs, stops the
# bus and the server and detaches our loop devices.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-2.5}
SEED=${VDISK_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
if [ -z "${BIN:-}" ]; then  # the newest of the debug and release builds
    BIN=.build/debug
    [ .build/release/vdisk -nt .build/debug/vdisk ] && BIN=.build/release
fi
BIN=$(cd "$BIN" && pwd)
missing=""
[ "$(id -u)" -eq 0 ] || missing="$missing root"
for f in /dev/fuse /dev/loop-control; do [ -e $f ] || missing="$missing $f"; done
for t in fio mkfs.ext4 fsck.ext4 losetup mount umount; do command -v $t >/dev/null || missing="$missing $t"; done
if [ -n "$missing" ]; then
    echo "soak-bus: needs$missing (Tools/setup.sh installs the tools)" >&2
    exit 1
fi
WORK=$(mktemp -d /var/tmp/vdisk-soak-bus.XXXXXX)
export VDISK_RUNTIME_DIR=$WORK/run  # a bus of our own: never the host's /run/vdisk

# Whatever state the soak stopped in (a failure, a timeout's SIGTERM), nothing stays behind: no mount,
# disk, bus, server or loop device of ours. The steps are bounded, since a dead bus or server can make a
# step wait.
cleanup() {
    status=$?
    trap - EXIT INT TERM
    set +e
    for point in $(awk -v w="$WORK/mnt/" 'index($2, w) == 1 { print $2 }' /proc/mounts); do
        umount "$point" 2>/dev/null || umount -l "$point"  # lazily where the disk is dead (a killed bus)
    done
    if [ -e "$VDISK_RUNTIME_DIR/bus.lock" ]; then
        timeout 60 "$BIN/vdisk" unplug --all --force >/dev/null 2>&1
        timeout 60 "$BIN/vdisk" bus --stop >/dev/null 2>&1
        pid=$(cat "$VDISK_RUNTIME_DIR/bus.lock" 2>/dev/null | tr -cd 0-9)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid"
            timeout 30 "$BIN/vdisk" list >/dev/null 2>&1  # a new bus removes the dead one's devices
            timeout 30 "$BIN/vdisk" bus --stop >/dev/null 2>&1
        fi
    fi
    [ -s "$WORK/serve.pid" ] && kill -9 "$(cat "$WORK/serve.pid")" 2>/dev/null
    for loop in $(losetup -nO NAME,BACK-FILE | awk -v r="$VDISK_RUNTIME_DIR/" 'index($2, r) == 1 { print $1 }'); do
        losetup -d "$loop"
    done
    for point in $(awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts); do
        umount -l "$point"
    done
    if grep -q " $WORK/" /proc/mounts; then
        echo "soak-bus: still mounted, $WORK kept:" >&2
        grep " $WORK/" /proc/mounts >&2
    elif [ "$status" -ne 0 ]; then
        cp "$VDISK_RUNTIME_DIR/bus.log" "$WORK/logs/" 2>/dev/null
        rm -rf "$WORK/run" "$WORK/mnt" "$WORK"/*.vimg
        echo "soak-bus: logs kept in $WORK/logs" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

echo "soak-bus: seed $SEED, $MINUTES minutes (rerun with VDISK_SEED=$SEED Tools/soak-bus.sh $MINUTES)"
/usr/bin/python3 - "$BIN" "$WORK" "$SEED" "$MINUTES" <<'EOF'
import atexit, hashlib, json, mmap, os, random, signal, socket, subprocess, sys, time, traceback

bin_dir, work, seed, minutes = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(seed)
vdisk, vimg = bin_dir + "/vdisk", bin_dir + "/vimg"
runtime = os.environ["VDISK_RUNTIME_DIR"]
logs = work + "/logs"
os.makedirs(logs)
SIZE = "256M"
SLOTS = 3  # files per disk, rewritten in turn; a disk holds at most SLOTS * 24 MiB of them
started = time.monotonic()
events = open(logs + "/events.log", "a", buffering=1)
counts = {}
disks, server = [], None


def note(message):
    events.write(f"{time.monotonic() - started:7.1f}s {message}\n")


def step(name):
    counts[name] = counts.get(name, 0) + 1
    note("event: " + name)


def tail(path, lines=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def report(message):
    note("FAILED: " + message)
    print(f"soak-bus: FAILED (seed {seed}): {message}", file=sys.stderr)
    for what, path in [("events", logs + "/events.log"), ("bus log", runtime + "/bus.log"),
                       ("remote server log", logs + "/serve.err")]:
        text = tail(path)
        if text:
            print(f"--- {what} ({path}), last lines:\n{text}", file=sys.stderr, end="")


def fail(message):
    report(message)
    sys.exit(1)


# An unexpected exception (an I/O error reading a file back...) is a failure like any other (exit 1).
sys.excepthook = lambda kind, value, tb: report("".join(traceback.format_exception(kind, value, tb)).strip())


def terminated(*_):
    """A timeout's SIGTERM: say where the soak was (it may have hung), then leave like a failure (the
    shell's trap cleans up)."""
    report("stopped by SIGTERM (a timeout?)")
    sys.exit(143)


signal.signal(signal.SIGTERM, terminated)


@atexit.register
def leave():
    """However the soak ends, the remote server is up and the fio processes end with it: the shell's trap
    then unmounts and unplugs at once. The server first: while it is away, the remote disk's I/O waits
    out its reconnect timeout, and so would its writer, killed or not."""
    if server and server.proc and server.proc.poll() is not None:
        server.start(quietly=True)
    for d in disks:
        if d.writer and d.writer.proc.poll() is None:
            d.writer.proc.kill()
            d.writer.proc.wait()


def run(args, ok=(0,), timeout=180, quiet=False):
    if not quiet:
        note("$ " + " ".join(args))
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        fail(f"{' '.join(args)} did not finish within {timeout} s")
    if r.returncode not in ok:
        fail(f"{' '.join(args)} exited {r.returncode}: {r.stdout}{r.stderr}")
    return r


def vd(args, ok=(0,), timeout=180, quiet=False):
    return run([vdisk, *args], ok=ok, timeout=timeout, quiet=quiet)


def mounted_under(prefix):
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


def our_loops():
    """Loop devices bound to a FUSE file of our bus."""
    lines = run(["losetup", "-nO", "NAME,BACK-FILE"], quiet=True).stdout.splitlines()
    return [line for line in lines if len(line.split()) > 1 and line.split()[1].startswith(runtime + "/")]


def direct_sha256(path, limit=None):
    """The sha256 of a file (or of a device's first `limit` bytes) read with O_DIRECT: from the disk, not
    from the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, 1 << 20)  # page aligned, as O_DIRECT wants
    digest = hashlib.sha256()
    done = 0
    try:
        while (limit is None or done < limit) and (n := os.readv(fd, [buffer])) > 0:
            digest.update(buffer[:n])
            done += n
    finally:
        os.close(fd)
    return digest.hexdigest()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def direct_io_works(folder):
    """Whether `folder`'s file system takes O_DIRECT (tmpfs does not); --cache=none needs it."""
    probe = folder + "/odirect.probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600))
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(probe):
            os.remove(probe)


CACHE_MODES = ["writeback", "none"] if direct_io_works(work) else ["writeback"]
generation = 0


class File:
    """A finished write phase: its file's name, fio's block size and size, and the content's sha256."""

    def __init__(self, name, params, sha):
        self.name, self.params, self.sha = name, params, sha


def verify(files, folder, what):
    """Every file in `files` under `folder` reads back as written: each block's header (its offset) and
    crc32c, read by fio with O_DIRECT (every block was written, in whatever order), and the whole file's
    sha256, also read with O_DIRECT: a block left from an older file would pass fio's check, not this one."""
    for f in files.values():
        path = f"{folder}/{f.name}"
        if not os.path.exists(path):
            fail(f"{what}: {f.name} is missing")
        r = run(["fio", "--name=verify", "--filename=" + path, "--thread", "--readonly", "--rw=read",
                 "--bs=" + f.params["bs"], "--size=" + f.params["size"], "--direct=1", "--ioengine=psync",
                 "--verify=crc32c", "--verify_fatal=1", f"--output={logs}/verify.fio"], ok=(0, 1))
        if r.returncode != 0:
            fail(f"{what}: fio's verification of {f.name} failed: {tail(logs + '/verify.fio', 12)}")
        if direct_sha256(path) != f.sha:
            fail(f"{what}: {f.name} reads back different from what fio wrote (sha256)")
    step("verification")
    counts["files verified"] = counts.get("files verified", 0) + len(files)


class Writer:
    """One write phase on a disk: a new file in `slot` (the slot's previous file is deleted first), written
    by fio with random parameters and verified by fio as it goes and at the end, fsynced before fio exits."""

    def __init__(self, disk, slot):
        global generation
        generation += 1
        old = disk.files.pop(slot, None)
        if old:
            os.remove(f"{disk.mnt}/{old.name}")
        self.disk, self.slot = disk, slot
        r = disk.rng
        engine = r.choice(["psync", "libaio"])
        self.params = {"rw": r.choice(["randwrite", "randwrite", "write"]),
                       "bs": r.choice(["4k", "16k", "64k", "128k"]), "size": f"{r.choice([8, 16, 24])}M",
                       "randseed": r.randrange(1, 1 << 31)}
        self.name = f"{slot}.g{generation}"
        p = self.params
        args = [
            "fio", "--name=" + self.name, f"--filename={disk.mnt}/{self.name}", "--thread", "--rw=" + p["rw"],
            "--bs=" + p["bs"], "--size=" + p["size"], f"--randseed={p['randseed']}", "--verify=crc32c",
            "--ioengine=" + engine, f"--iodepth={r.choice([1, 4, 16]) if engine == 'libaio' else 1}",
            f"--direct={r.choice([0, 1])}", "--do_verify=1", "--verify_fatal=1", "--end_fsync=1",
            f"--output={logs}/{disk.name}.fio"]
        if r.random() < 0.5:
            args.append(f"--verify_backlog={r.choice([64, 512])}")
        note(f"{disk.name}: writing {self.name}: " + " ".join(args[2:]))
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def finished(self):
        """None while fio runs; else True once its file is finished and recorded."""
        if self.proc.poll() is None:
            return None
        if self.disk.crashed:
            note(f"{self.disk.name}: {self.name} dropped (exit {self.proc.returncode}): the bus was killed")
            return False
        if self.proc.returncode != 0:
            fail(f"fio on {self.disk.name} ({self.name}) exited {self.proc.returncode}: "
                 f"{tail(logs + '/' + self.disk.name + '.fio', 15)}")
        # The reference: the file as fio left it, read back through the page cache (what fio wrote).
        try:
            sha = file_sha256(f"{self.disk.mnt}/{self.name}")
        except OSError as e:
            fail(f"reading {self.name} on {self.disk.name} after fio wrote it: {e}")
        self.disk.files[self.slot] = File(self.name, self.params, sha)
        step("write phase")
        return True


class Server:
    """The remote disk's server: `vdisk serve` of a VIMG image on a unix socket, export "r"."""

    def __init__(self, image):
        self.image, self.sock, self.proc = image, work + "/remote.sock", None

    def start(self, quietly=False):
        """Starts the server and waits until it listens; `quietly`: on the way out, where failing again
        would not help."""
        cache = rng.choice(CACHE_MODES)
        # A session of its own: a timeout's SIGTERM to our process group must leave it serving until the
        # trap has unplugged the remote disk (it is stopped after).
        self.proc = subprocess.Popen(
            [vdisk, "serve", "--cache=" + cache, "--socket", self.sock, "--export", "r", self.image],
            stdout=subprocess.DEVNULL, stderr=open(logs + "/serve.err", "a"), start_new_session=True)
        with open(work + "/serve.pid", "w") as f:
            f.write(str(self.proc.pid))
        note(f"remote server started (pid {self.proc.pid}, --cache={cache})")
        for _ in range(400):
            if self.proc.poll() is not None:
                if quietly:
                    return
                fail(f"vdisk serve exited {self.proc.returncode}: {tail(logs + '/serve.err', 5)}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.sock)
                return
            except OSError:
                time.sleep(0.025)
        if not quietly:
            fail("vdisk serve did not listen")

    def stop(self, kill=False):
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            fail("vdisk serve did not stop within 60 s of SIGTERM")
        if status != (-signal.SIGKILL if kill else 0):
            fail(f"vdisk serve exited {status} on stop: {tail(logs + '/serve.err', 5)}")
        os.remove(work + "/serve.pid")


class Disk:
    def __init__(self, name, kind, image=None):
        self.name, self.kind, self.image = name, kind, image
        self.local = kind in ("vimg", "clone")  # an image file of ours (the remote one is the server's)
        self.mnt = f"{work}/mnt/{name}"
        os.makedirs(self.mnt)
        self.device = None
        self.files = {}      # slot -> File, finished and fsynced
        self.snapshots = {}  # snapshot name -> the files it holds
        self.writer = None
        self.hold = True     # no new write phase (an event needs the disk quiet)
        self.away = False    # its server is down: leave its writer alone (reading its file would wait)
        self.crashed = False
        # Write phases start when the disk is free, a moment that depends on timing: each disk draws their
        # parameters from a generator of its own, so the events' generator takes the same path on a rerun.
        self.rng = random.Random(f"{seed}-{name}")

    def plug(self):
        if self.kind == "ram":
            args = ["--ram", SIZE]
        elif self.kind == "remote":
            # Long enough for any outage of ours (a restart, vimg check, a pause).
            args = [f"nbd+unix:///r?socket={server.sock}", "--reconnect-timeout", "120"]
        else:
            args = [self.image, "--cache=" + rng.choice(CACHE_MODES),
                    "--discard=" + rng.choice(["punch", "free"])]
        self.device = vd(["plug", "--device", "loop", "--name", self.name, *args]).stdout.split("\n")[0]
        note(f"{self.name}: plugged as {self.device}")

    def mount(self):
        options = rng.choice(["defaults", "discard"])
        run(["mount", "-t", "ext4", "-o", options, self.device, self.mnt])
        self.hold = False

    def fsck(self, what):
        r = run(["fsck.ext4", "-fn", self.device], ok=(0, 1, 2, 4, 8))
        if r.returncode != 0:
            fail(f"{what}: fsck.ext4 -fn {self.device} ({self.name}) exited {r.returncode}: "
                 f"{r.stdout}{r.stderr}")
        step("fsck clean")

    def quiesce(self):
        """Lets the running write phase finish and starts no other."""
        self.hold = True
        wait_for(lambda: self.writer is None, f"{self.name}'s writer to finish", 300)


def service():
    """Reaps finished write phases and starts new ones on every disk that is free."""
    for d in disks:
        if d.away:
            continue
        if d.writer and d.writer.finished() is not None:
            d.writer = None
        if d.writer is None and not d.hold and time.monotonic() < deadline:
            d.writer = Writer(d, f"s{d.rng.randrange(SLOTS)}")


def wait_for(condition, what, timeout):
    limit = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > limit:
            fail(f"waited {timeout} s for {what}")
        service()
        time.sleep(0.1)


def pause(seconds):
    limit = time.monotonic() + seconds
    wait_for(lambda: time.monotonic() >= limit, "a pause", seconds + 60)


def check_image(image, ok=(0,)):
    """`vimg check`; where leaks are allowed (exit 3), they are repaired and the image checked again."""
    if run([vimg, "check", image], ok=ok).returncode == 3:
        run([vimg, "check", "-r", "leaks", image])
        run([vimg, "check", image])
        step("leaks repaired")


def check_snapshot(d, name):
    """Plugs snapshot `name` of `d` read-only (beside the live disk, while it is plugged): fsck finds its
    frozen file system clean, and every file finished before the snapshot reads back."""
    point = f"{work}/mnt/{d.name}-{name}"
    os.makedirs(point, exist_ok=True)
    device = vd(["plug", "--device", "loop", "--read-only", "--snapshot", name, "--name", f"{d.name}-{name}",
                 d.image]).stdout.split("\n")[0]
    r = run(["fsck.ext4", "-fn", device], ok=(0, 1, 2, 4, 8))
    if r.returncode != 0:
        fail(f"snapshot {name} of {d.name}: fsck.ext4 -fn exited {r.returncode}: {r.stdout}{r.stderr}")
    run(["mount", "-t", "ext4", "-o", "ro", device, point])
    verify(d.snapshots[name], point, f"snapshot {name} of {d.name}")
    run(["umount", point])
    vd(["unplug", f"{d.name}-{name}"])
    step("snapshot checked")


# --- the events ------------------------------------------------------------------------------------


def ev_snapshot(d):
    name = f"n{counts.get('snapshot', 0)}"
    taken = dict(d.files)  # only files whose phase was seen finished before the snapshot
    r = vd(["snapshot", d.name, name])
    note(r.stdout.strip().replace("\n", " | "))
    if ": frozen" not in r.stdout:
        fail(f"vdisk snapshot {d.name} {name} did not freeze {d.mnt}: {r.stdout}")
    d.snapshots[name] = taken
    step("snapshot")


def ev_snapshot_check(d):
    check_snapshot(d, rng.choice(sorted(d.snapshots)))


def ev_online_verify(d):
    verify(d.files, d.mnt, f"{d.name} (online)")


def ev_replug(d):
    d.quiesce()
    if rng.random() < 0.3:
        vd(["unplug", "--force", d.name])  # unmounts first
        step("unplug --force")
    else:
        run(["umount", d.mnt])
        vd(["unplug", d.name])
    if d.local:
        check_image(d.image)
        if d.snapshots and rng.random() < 0.5:
            name = rng.choice(sorted(d.snapshots))
            run([vimg, "snapshot", "-d", name, d.image])
            del d.snapshots[name]
            check_image(d.image)
            step("snapshot delete")
    d.plug()
    d.fsck(f"{d.name} after replug")
    d.mount()
    verify(d.files, d.mnt, f"{d.name} after replug")
    step("replug")


def link():
    """The remote disk's link as `vdisk list` reports it: state, reconnects..."""
    listed = json.loads(vd(["list", "--output=json"], quiet=True).stdout)
    return next(e.get("connection") for e in listed if e["name"] == "remote")


def ev_server_outage(kill):
    """The remote server goes away under the remote disk's writer and comes back on the same socket; the
    bus connects again (its writer keeps it busy, so it notices) and nothing above it sees an error."""
    reconnects = link()["reconnects"]
    # Until the server is back, any I/O on the remote disk waits for it, and this process restarts it:
    # only the writer (fio) may wait meanwhile.
    remote.away = True
    server.stop(kill=kill)
    step("server kill -9" if kill else "server restart")
    # kill -9 may leak clusters (allocated, not yet referenced): allowed, then freed; never corruption.
    check_image(server.image, ok=(0, 3) if kill else (0,))
    pause(rng.uniform(0, 3))
    server.start()
    remote.away = False
    # A read of our own (the writer may be between phases): held until the bus has connected again.
    try:
        direct_sha256(remote.device, limit=1 << 20)
    except OSError as e:
        fail(f"reading {remote.device} (the remote disk) after its server came back: {e}")
    if (now := link())["state"] != "connected" or now["reconnects"] <= reconnects:
        fail(f"the remote disk's link after its server came back: {now}")
    note(f"remote link: {now}")


def ev_bus_kill():
    with open(runtime + "/bus.lock") as f:
        pid = int("".join(c for c in f.read() if c.isdigit()))
    for d in disks:
        d.crashed, d.hold = True, True
    os.kill(pid, signal.SIGKILL)
    step("bus kill -9")
    limit = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < limit:
        time.sleep(0.02)
    # Every writer meets a dead disk (EIO) and fails; one that somehow hangs is killed.
    for d in disks:
        if d.writer:
            try:
                d.writer.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                note(f"{d.name}: fio still running 60 s after the bus died; killed")
                d.writer.proc.kill()
                d.writer.proc.wait()
            d.writer.finished()
            d.writer = None
    # The file systems on the dead disks are ours to unmount; the new bus removes the rest.
    for d in disks:
        run(["umount", "-l", d.mnt])
    r = vd(["list"])
    if r.stdout != "No disks are plugged.\n":
        fail(f"vdisk list after the bus was killed: {r.stdout}{r.stderr}")
    note("new bus: " + r.stderr.strip().replace("\n", " | "))
    limit = time.monotonic() + 30
    while (our_loops() or mounted_under(runtime + "/")) and time.monotonic() < limit:
        time.sleep(0.1)
    if our_loops() or mounted_under(runtime + "/"):
        fail(f"left behind by the dead bus: {our_loops()} {mounted_under(runtime + '/')}")
    for d in disks:
        d.crashed = False
        if d.local:
            check_image(d.image, ok=(0, 3))
        d.plug()
        if d.kind == "ram":  # its bytes died with the bus: a new, empty disk
            d.files, d.snapshots = {}, {}
            run(["mkfs.ext4", "-q", d.device])
            d.mount()
            continue
        # The kernel replays the journal at mount; then the file system must be clean.
        run(["mount", "-t", "ext4", d.device, d.mnt])
        run(["umount", d.mnt])
        d.fsck(f"{d.name} after the bus was killed")
        d.mount()
        known = {f.name for f in d.files.values()}
        for entry in os.listdir(d.mnt):
            if entry not in known and entry != "lost+found":
                note(f"{d.name}: {entry} was being written when the bus died; removed")
                os.remove(f"{d.mnt}/{entry}")
        verify(d.files, d.mnt, f"{d.name} after the bus was killed")
    step("bus recovered")


# --- setup -----------------------------------------------------------------------------------------

os.makedirs(runtime)
images = {k: f"{work}/{k}.vimg" for k in ["img", "base", "clone", "remote"]}
for k in ["img", "base", "remote"]:
    run([vimg, "create", images[k], SIZE])
deadline = time.monotonic() + 3600  # until the soak starts: writers may run
img, clone = Disk("img", "vimg", images["img"]), Disk("clone", "clone", images["clone"])
ram, remote = Disk("ram", "ram"), Disk("remote", "remote", images["remote"])
# The base: a file system with a finished file in it, then closed for good; the clone reads through it.
base = Disk("base", "vimg", images["base"])
base.plug()
run(["mkfs.ext4", "-q", base.device])
base.mount()
base.writer = Writer(base, "base")
base.hold = True
while base.writer.finished() is None:
    time.sleep(0.1)
run(["umount", base.mnt])
vd(["unplug", "base"])
run([vimg, "check", images["base"]])
base_sha = file_sha256(images["base"])
run([vimg, "clone", images["base"], images["clone"]])
clone.files = dict(base.files)  # kept for good: SLOTS never names "base"
server = Server(images["remote"])
server.start()
disks = [img, clone, ram, remote]
for d in disks:
    d.plug()
    if d.kind != "clone":
        run(["mkfs.ext4", "-q", d.device])
    d.mount()
verify(clone.files, clone.mnt, "the clone's files from its base")

# --- the soak --------------------------------------------------------------------------------------

EVENTS = {  # name -> (weight, disks it applies to)
    "snapshot": (3, lambda: [d for d in (img, clone) if len(d.snapshots) < 3]),
    "snapshot check": (1, lambda: [d for d in (img, clone) if d.snapshots]),
    "online verify": (1.5, lambda: [d for d in disks if d.files]),
    "replug": (2, lambda: [img, clone, remote]),
    "server restart": (1.2, lambda: [remote]),
    "server kill -9": (1.2, lambda: [remote]),
    "bus kill -9": (0.8, lambda: [None]),
}
not_yet = sorted(EVENTS)  # every kind once first (in a random order), so a short soak meets them all
rng.shuffle(not_yet)
deadline = time.monotonic() + minutes * 60
while True:
    pause(rng.uniform(2, 8))
    if time.monotonic() >= deadline:
        break
    candidates = [e for e in (not_yet or sorted(EVENTS)) if EVENTS[e][1]()]
    if not candidates:
        continue
    event = candidates[0] if not_yet else rng.choices(candidates, [EVENTS[e][0] for e in candidates])[0]
    if event in not_yet:
        not_yet.remove(event)
    target = rng.choice(EVENTS[event][1]())
    note(f"--- {event}" + (f" of {target.name}" if target else ""))
    if event == "snapshot":
        ev_snapshot(target)
    elif event == "snapshot check":
        ev_snapshot_check(target)
    elif event == "online verify":
        ev_online_verify(target)
    elif event == "replug":
        ev_replug(target)
    elif event == "server restart":
        ev_server_outage(kill=False)
    elif event == "server kill -9":
        ev_server_outage(kill=True)
    else:
        ev_bus_kill()

# --- the end: every file verified where it lasts (the RAM disk online, the rest from the closed images) -

note("--- the end")
for d in disks:
    d.quiesce()
if (state := link())["state"] != "connected":
    fail(f"the remote disk's link at the end: {state}")
verify(ram.files, ram.mnt, "ram at the end")
for d in disks:
    run(["umount", d.mnt])
    d.fsck(f"{d.name} at the end")
vd(["unplug", "--all"])
if vd(["list"]).stdout != "No disks are plugged.\n":
    fail("disks left after vdisk unplug --all")
server.stop()
server = None  # stopped for good: nothing to restart on the way out
for d in (img, clone, remote):
    check_image(d.image)
    # Plugged again from its file (read-only, so a cold cache and nothing replayed): every file is there.
    d.device = vd(["plug", "--device", "loop", "--read-only", "--name", d.name, d.image]).stdout.split("\n")[0]
    d.fsck(f"{d.name} plugged again from its image")
    run(["mount", "-t", "ext4", "-o", "ro", d.device, d.mnt])
    verify(d.files, d.mnt, f"{d.name} plugged again from its image")
    run(["umount", d.mnt])
    vd(["unplug", d.name])
    for name in sorted(d.snapshots):
        check_snapshot(d, name)
    check_image(d.image)
check_image(images["base"])
if file_sha256(images["base"]) != base_sha:
    fail("the base image changed under its clone")
vd(["bus", "--stop"])
if our_loops() or mounted_under(work + "/") or os.path.exists(runtime + "/bus.lock"):
    fail(f"left behind: {our_loops()} {mounted_under(work + '/')}")
summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
print(f"soak-bus: passed in {time.monotonic() - started:.0f} s; {summary}")
EOF
