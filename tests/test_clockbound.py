"""The ClockBound segment: layout read by an independent reader written from ClockBound's
docs/PROTOCOL.md, the application API, torn-write safety across processes, file safety."""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from guest_client.clockbound_feed import GuestBound, published_bound
from guest_client.clockbound_writer import ClockBoundWriter, Fence, PublishedBound
from guest_client.shm_file import SegmentFileError
from timesyncd.clockbound import (
    CLOCK_MONOTONIC_COARSE,
    BoundedClock,
    ClockStatus,
    Now,
    check_window,
)

ROOT = Path(__file__).resolve().parent.parent
_NS = 1_000_000_000


def spec_read(path: str) -> dict[str, int]:
    """ClockBound protocol version 2, field by field at the offsets PROTOCOL.md draws (native
    byte order), with the generation protocol: this shares no code with timesyncd."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
        # Wait by time, not by tries: the writer's thread sits in membarrier (an RCU grace
        # period) between its odd and even stores, which takes longer on a loaded machine,
        # and a reader that spins without sleeping also starves it of the GIL.
        deadline = time.monotonic() + 5.0
        while True:
            gen1 = struct.unpack_from("=H", m, 14)[0]
            raw = bytes(m[0:80])
            gen2 = struct.unpack_from("=H", m, 14)[0]
            if gen1 == gen2 and gen1 % 2 == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"never a stable generation in 5 s (last {gen1}, {gen2})")
            time.sleep(0.0005)
    return {
        "magic0": struct.unpack_from("=I", raw, 0)[0],
        "magic1": struct.unpack_from("=I", raw, 4)[0],
        "segsize": struct.unpack_from("=I", raw, 8)[0],
        "version": struct.unpack_from("=H", raw, 12)[0],
        "generation": gen1,
        "as_of": struct.unpack_from("=q", raw, 16)[0] * _NS + struct.unpack_from("=q", raw, 24)[0],
        "void_after": struct.unpack_from("=q", raw, 32)[0] * _NS
        + struct.unpack_from("=q", raw, 40)[0],
        "bound": struct.unpack_from("=q", raw, 48)[0],
        "disruption_marker": struct.unpack_from("=Q", raw, 56)[0],
        "max_drift": struct.unpack_from("=I", raw, 64)[0],
        "status": struct.unpack_from("=i", raw, 68)[0],
        "disruption_support": raw[72],
    }


def coarse_ns() -> int:
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


def test_segment_layout_matches_the_protocol(tmp_path: Path) -> None:
    path = str(tmp_path / "shm0")
    w = ClockBoundWriter(path, void_after_s=3.0)
    try:
        first = spec_read(path)
        assert first["status"] == 0 and first["version"] == 2  # UNKNOWN until a bound is known
        assert first["bound"] == 16 * _NS  # and wide, for a client that ignores the status
        as_of = coarse_ns()
        w.write(PublishedBound(as_of, 1_234_567, 15_000, ClockStatus.SYNCHRONIZED))
        seg = spec_read(path)
        # the magic is two native-endian u32, as ClockBound compares it (not a byte string)
        assert (seg["magic0"], seg["magic1"]) == (0x414D5A4E, 0x43420200)
        assert seg["segsize"] == 80 == os.path.getsize(path)
        assert seg["generation"] == first["generation"] + 2 and seg["generation"] % 2 == 0
        assert seg["as_of"] == as_of and seg["void_after"] == as_of + 3 * _NS
        assert (seg["bound"], seg["max_drift"], seg["status"]) == (1_234_567, 15_000, 1)
        assert seg["disruption_support"] == 0 and seg["disruption_marker"] == 0  # no VMClock
        w.write(PublishedBound(as_of, 5, 1, ClockStatus.FREE_RUNNING))
        assert spec_read(path)["status"] == 2
    finally:
        w.close()
    assert spec_read(path)["status"] == 0  # written on stop; the file stays for readers
    w2 = ClockBoundWriter(path, void_after_s=3.0)  # a restart keeps counting generations
    try:
        assert spec_read(path)["generation"] > seg["generation"]
    finally:
        w2.close()


def test_generation_wraps_to_two_never_zero(tmp_path: Path) -> None:
    path = str(tmp_path / "shm0")
    w = ClockBoundWriter(path, void_after_s=3.0, fence=Fence(membarrier=False))
    try:
        seen = set()
        for i in range(33_000):
            w.write(PublishedBound(coarse_ns(), i, 0, ClockStatus.SYNCHRONIZED))
            if i % 997 == 0 or i > 32_760:
                seen.add(spec_read(path)["generation"])
        assert 0 not in seen and 2 in seen and 65534 in seen
    finally:
        w.close()


def test_api_widens_by_drift_and_voids(tmp_path: Path) -> None:
    path = str(tmp_path / "shm0")
    w = ClockBoundWriter(path, void_after_s=0.3)
    real = 1_700_000_000 * _NS
    try:
        clock = BoundedClock(path, realtime_ns=lambda: real)
        assert clock.now().status is ClockStatus.UNKNOWN
        as_of = coarse_ns() - 100_000_000  # published 0.1 s ago
        w.write(PublishedBound(as_of, 1_000_000, 1_000_000, ClockStatus.SYNCHRONIZED))
        t = clock.now()
        assert isinstance(t, Now) and t.status is ClockStatus.SYNCHRONIZED
        # 1 ms + 1000 ppm x >= 0.1 s elapsed
        assert 1_100_000 <= real - t.earliest_ns == t.latest_ns - real < 1_400_000
        e, lt, st = clock.now_ns()
        assert st is t.status and lt - e == t.latest_ns - t.earliest_ns
        time.sleep(0.25)
        assert clock.now().status is ClockStatus.UNKNOWN  # past void-after
        w.write(PublishedBound(coarse_ns(), 10, 0, ClockStatus.FREE_RUNNING))
        time.sleep(0.002)  # a reader sees a new generation within 1 ms
        assert clock.now().status is ClockStatus.FREE_RUNNING
        clock.close()
    finally:
        w.close()


def test_check_window_fails_closed() -> None:
    s = ClockStatus.SYNCHRONIZED
    t = Now(100 * _NS - 5_000_000, 100 * _NS + 5_000_000, s)  # 100 s +- 5 ms
    assert check_window(t, 50, 200).verdict == "valid"
    assert check_window(t, 50, 99).verdict == "invalid"  # certainly expired
    assert check_window(t, 101, 200) == check_window(t, 101, None)
    assert check_window(t, 101, 200).reason == "not_yet_valid"
    # an exp inside the bound may have passed: not accepted unless asked for
    assert check_window(t, 50, 100.001).reason == "may_be_expired"
    assert check_window(t, 50, 100.001, accept_possibly_expired=True).valid
    assert check_window(t, 50, 100.001, leeway_s=0.01).valid
    assert check_window(t, 99.999, 200).reason == "may_not_be_valid_yet"
    assert check_window(t, 99.999, 200, accept_possibly_early=True).valid
    assert check_window(t, 99.999, 100.001, accept_possibly_early=True).reason == "may_be_expired"
    unknown = Now(t.earliest_ns, t.latest_ns, ClockStatus.UNKNOWN)
    assert check_window(unknown, 0, 10**10).verdict == "uncertain"
    assert check_window(unknown, 0, 10**10, accept_possibly_expired=True).reason == "clock_unknown"
    assert check_window(Now(t.earliest_ns, t.latest_ns, ClockStatus.FREE_RUNNING), 50, 200).valid


def test_feed_adds_coarse_tick_and_maps_states() -> None:
    pb = published_bound(GuestBound("synchronised", 0.001, 1e-5), 7, 4_000_000)
    assert pb == PublishedBound(7, 1_000_040, 10_000, ClockStatus.SYNCHRONIZED)
    assert published_bound(GuestBound("holdover", 0.5, 1e-6), 7, 0).status is \
        ClockStatus.FREE_RUNNING
    unsync = published_bound(GuestBound("unsynchronised", None, 1e-6), 7, 0)
    assert unsync.status is ClockStatus.UNKNOWN and unsync.bound_ns == 16 * _NS
    assert published_bound(GuestBound("synchronised", 99.0, 1e-6), 7, 0).status is \
        ClockStatus.UNKNOWN  # beyond what the kernel can carry: not a synchronised claim


def test_client_module_imports_only_the_standard_library() -> None:
    code = textwrap.dedent("""
        import sys
        before = set(sys.modules)
        from timesyncd import clockbound
        new = set(sys.modules) - before
        ours = {m for m in new if m.split(".")[0] not in sys.stdlib_module_names}
        print(sorted(ours))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == ["timesyncd", "timesyncd.clockbound"]


# --- torn writes -----------------------------------------------------------------------------

HAMMER = textwrap.dedent("""
    import json, mmap, struct, sys, time
    from timesyncd.clockbound import BoundedClock, SegmentError
    path, seconds = sys.argv[1], float(sys.argv[2])
    min_reads, min_changes = int(sys.argv[3]), int(sys.argv[4])
    api = BoundedClock(path)
    fh = open(path, "rb")
    m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    body = struct.Struct("=qqqqqQIiB7x")
    n = torn = api_torn = changes = unstable = 0
    last = None
    print("ready", flush=True)
    # at least ``seconds``, and on until more than ``min_reads`` copies and ``min_changes``
    # writes were seen (a loaded machine lets few through: each membarrier write waits for
    # an RCU grace period), at most 60 s more
    end = time.monotonic() + seconds
    hard_end = end + 60
    while (time.monotonic() < end or changes <= min_changes or n <= min_reads) \
            and time.monotonic() < hard_end:
        for _ in range(200):
            g1 = struct.unpack_from("=H", m, 14)[0]
            f = body.unpack_from(m, 16)
            g2 = struct.unpack_from("=H", m, 14)[0]
            if g1 != g2 or g1 & 1:
                continue
            n += 1
            k = f[4]  # the writer derives every field from k
            if f[:4] != (k, k % 1000, k + 3, k % 1000) or f[6] != k % 1000 or f[7] != 1:
                torn += 1
            if k != last:
                changes, last = changes + 1, k
            try:
                s = api.snapshot()
            except SegmentError:  # the writer kept it odd for all of the API's retries: a
                unstable += 1     # clear error, never a torn value (membarrier under load)
                continue
            if s.as_of_ns != s.bound_ns * 10**9 + s.bound_ns % 1000 or \\
                    s.max_drift_ppb != s.bound_ns % 1000:
                api_torn += 1
    print(json.dumps({"reads": n, "torn": torn, "api_torn": api_torn, "changes": changes,
                      "api_unstable": unstable}))
""")


def hammer(path: str, write: object, seconds: float = 1.5, least: tuple[int, int] = (0, 0)
           ) -> dict[str, int]:
    """A reader process copying the segment as fast as it can while ``write(k)`` runs, for
    ``seconds`` and until it made more than ``least`` = (copies, writes seen)."""
    proc = subprocess.Popen([sys.executable, "-c", HAMMER, path, str(seconds),
                             str(least[0]), str(least[1])], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        k = 1000
        while proc.poll() is None:
            k += 1
            write(k)  # type: ignore[operator]
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return json.loads(out)  # type: ignore[no-any-return]


def body_for(k: int) -> PublishedBound:
    return PublishedBound(k * _NS + k % 1000, k, k % 1000, ClockStatus.SYNCHRONIZED)


@pytest.mark.parametrize("fence", ["membarrier", "tso"])
def test_reader_in_another_process_never_sees_a_torn_body(tmp_path: Path, fence: str) -> None:
    if fence == "tso" and os.uname().machine not in ("x86_64", "amd64"):
        pytest.skip("no-fence writes are only correct on a TSO machine")
    chosen = Fence(membarrier=fence == "membarrier")
    if chosen.kind != fence:
        pytest.skip("membarrier(MEMBARRIER_CMD_GLOBAL) not available here")
    path = str(tmp_path / "shm0")
    w = ClockBoundWriter(path, void_after_s=3.0, fence=chosen)
    w.write(body_for(1000))
    # a membarrier write takes 10-100 ms (an RCU grace period) and the generation stays odd
    # meanwhile: fewer copies get through than with the TSO-only writer, which hammers
    low = (20, 3) if fence == "membarrier" else (1000, 20)
    try:
        res = hammer(path, lambda k: w.write(body_for(k)),
                     seconds=2.5 if fence == "membarrier" else 1.5, least=low)
    finally:
        w.close()
    print(fence, res)
    assert res["reads"] > low[0] and res["changes"] > low[1], res
    assert res["torn"] == 0 and res["api_torn"] == 0, res


def test_the_hammer_detects_writes_without_the_generation_protocol(tmp_path: Path) -> None:
    """The check above can fail: field-by-field writes with no odd generation are caught."""
    path = str(tmp_path / "shm0")
    w = ClockBoundWriter(path, void_after_s=3.0, fence=Fence(membarrier=False))
    w.write(body_for(1000))
    m = w._map

    def unsafe(k: int) -> None:
        b = body_for(k)
        for off, fmt, v in ((16, "=q", b.as_of_monotonic_ns // _NS), (24, "=q", k % 1000),
                            (32, "=q", k + 3), (40, "=q", k % 1000), (48, "=q", k),
                            (64, "=I", k % 1000)):
            struct.pack_into(fmt, m, off, v)

    try:
        res = hammer(path, unsafe, seconds=2.0)
    finally:
        w.close()
    assert res["torn"] > 0, res


# --- file safety -----------------------------------------------------------------------------


def test_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    (tmp_path / "shm0").symlink_to(target)
    with pytest.raises(SegmentFileError, match="symlink"):
        ClockBoundWriter(str(tmp_path / "shm0"), 3.0)
    assert target.read_bytes() == b"keep me"


def test_refuses_a_file_owned_by_someone_else(tmp_path: Path) -> None:
    path = tmp_path / "shm0"
    path.write_bytes(bytes(80))
    os.chown(path, 65534, 65534)
    with pytest.raises(SegmentFileError, match="owned by uid 65534"):
        ClockBoundWriter(str(path), 3.0)


def test_refuses_a_hard_link_and_a_fifo(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"x" * 100)
    os.link(other, tmp_path / "shm0")
    with pytest.raises(SegmentFileError, match="hard links"):
        ClockBoundWriter(str(tmp_path / "shm0"), 3.0)
    assert other.read_bytes() == b"x" * 100
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SegmentFileError, match="not a regular file"):
        ClockBoundWriter(str(tmp_path / "fifo"), 3.0)


def test_a_second_writer_is_detected_and_named(tmp_path: Path) -> None:
    path = str(tmp_path / "shm0")
    w = ClockBoundWriter(path, 3.0)
    try:
        me = rf"locked by another writer \(pid {os.getpid()}"
        with pytest.raises(SegmentFileError, match=me):
            ClockBoundWriter(path, 3.0)
    finally:
        w.close()
    # a writer that does not lock (as ClockBound's daemon) but maps the segment writable
    holder = subprocess.Popen(
        [sys.executable, "-c", "import mmap,sys; f=open(sys.argv[1],'r+b'); "
         "m=mmap.mmap(f.fileno(),80); print('mapped',flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "mapped"
        with pytest.raises(SegmentFileError, match=rf"already written by pid {holder.pid} "):
            ClockBoundWriter(path, 3.0)
    finally:
        holder.kill()
        holder.wait()
    ClockBoundWriter(path, 3.0).close()  # usable again once it is gone


def test_never_shrinks_and_sets_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "shm0"
    path.write_bytes(b"\xff" * 4096)
    os.chmod(path, 0o666)
    old = os.umask(0)
    try:
        w = ClockBoundWriter(str(path), 3.0)
    finally:
        os.umask(old)
    try:
        assert path.stat().st_size == 4096  # a reader may have it mapped: never shrink
        assert path.stat().st_mode & 0o777 == 0o644
        assert spec_read(str(path))["segsize"] == 80
    finally:
        w.close()
    fresh = tmp_path / "sub" / "shm0"  # a missing directory is created
    old = os.umask(0)
    try:
        ClockBoundWriter(str(fresh), 3.0).close()
    finally:
        os.umask(old)
    assert fresh.stat().st_mode & 0o777 == 0o644


def test_truncation_under_the_writer_is_refused_not_a_crash(tmp_path: Path) -> None:
    path = str(tmp_path / "shm0")
    w = ClockBoundWriter(path, 3.0)
    with open(path, "r+b") as fh:
        fh.truncate(0)
    with pytest.raises(OSError, match="truncated"):
        w.write(PublishedBound(coarse_ns(), 1, 1, ClockStatus.SYNCHRONIZED))
    assert w.counters["file_truncated"] == 1
    w.close()  # logs, does not crash


def test_a_writer_appearing_later_is_counted(tmp_path: Path) -> None:
    path = str(tmp_path / "shm0")
    w = ClockBoundWriter(path, 3.0, fence=Fence(membarrier=False))
    try:
        w.write(PublishedBound(coarse_ns(), 1, 1, ClockStatus.SYNCHRONIZED))
        with open(path, "r+b") as fh:  # another writer bumps the generation
            fh.seek(14)
            fh.write(struct.pack("=H", spec_read(path)["generation"] + 2))
        w.write(PublishedBound(coarse_ns(), 1, 1, ClockStatus.SYNCHRONIZED))
        assert w.counters["foreign_writer"] == 1
        w.write(PublishedBound(coarse_ns(), 1, 1, ClockStatus.SYNCHRONIZED))
        assert w.counters["foreign_writer"] == 1 and w.counters["writes"] == 4
    finally:
        w.close()


def test_wait_until_synchronised(tmp_path: Path) -> None:
    path = str(tmp_path / "shm0")
    w = ClockBoundWriter(path, 3.0, fence=Fence(membarrier=False))
    try:
        clock = BoundedClock(path)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="status UNKNOWN"):
            clock.wait_until_synchronised(0.2)
        assert 0.2 <= time.monotonic() - t0 < 1.0
        w.write(PublishedBound(coarse_ns(), 1000, 1000, ClockStatus.FREE_RUNNING))
        with pytest.raises(TimeoutError, match="FREE_RUNNING"):
            clock.wait_until_synchronised(0.1)  # holdover is not synchronised
        timer = threading.Timer(0.2, lambda: w.write(
            PublishedBound(coarse_ns(), 1000, 1000, ClockStatus.SYNCHRONIZED)))
        timer.start()
        t = clock.wait_until_synchronised(5.0)
        timer.join()
        assert t.status is ClockStatus.SYNCHRONIZED and t.bound_ns >= 1000
        clock.close()
    finally:
        w.close()
