"""What a kernel transmit stamp buys a UDP client's t1, against a real ``chronyd -x`` on loopback.

    python bench/send_stamps.py --exchanges 200

Server and client share the machine clock, so the true offset is 0 and every measured offset is
error. Each exchange is computed twice from the same packets: with t1 from user space, read
right before ``send()`` of the encoded packet (as the relay's upstream stamps its send), and
with the kernel's ``TX_SCHED`` stamp (as ``timesyncd.transport.udp`` now does); t4 is the
kernel's receive stamp in both. Half the difference is the send path left unmeasured.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from chrony_fixture import chronyd  # noqa: E402

from timesyncd.ntptime import ntp_to_unix_ns, unix_ns_to_ntp  # noqa: E402
from timesyncd.packet import NtpPacket, decode  # noqa: E402
from timesyncd.transport import kernel_stamps  # noqa: E402


def exchange(sock: socket.socket) -> tuple[float, float]:
    """One exchange: (offset with the user-space t1, offset with the kernel's), in us."""
    request = NtpPacket(transmit_ts=unix_ns_to_ntp(time.time_ns())).encode()
    user_t1 = time.time_ns()  # right before send(), as the relay's upstream stamps it
    sock.send(request)
    kernel_t1, _ = kernel_stamps.drain_tx_stamps(sock)
    if not select.select([sock], [], [], 2.0)[0]:
        raise RuntimeError("chronyd did not answer in 2 s")
    data, anc, _, _ = sock.recvmsg(1024, kernel_stamps.CMSG_SPACE)
    t4 = kernel_stamps.stamp_from_ancillary(anc)
    if kernel_t1 is None or t4 is None:
        raise RuntimeError("the kernel gave no transmit or receive stamp")
    reply = decode(data)
    t2, t3 = (ntp_to_unix_ns(ts, user_t1) for ts in (reply.receive_ts, reply.transmit_ts))

    def offset(t1: int) -> float:
        return ((t2 - t1) + (t3 - t4)) / 2 / 1000

    return offset(user_t1), offset(kernel_t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exchanges", type=int, default=200)
    args = ap.parse_args()
    with chronyd(stratum=2) as server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((server.host, server.port))
        sock.setblocking(False)  # as the guest's: a timeout socket retries empty reads
        if not kernel_stamps.enable_tx_stamps(sock):
            raise SystemExit("this kernel refuses transmit stamps")
        rows = []
        for _ in range(args.exchanges):
            rows.append(exchange(sock))
            time.sleep(0.05)
    for name, column in (("user-space t1", 0), ("kernel TX_SCHED t1", 1)):
        values = [row[column] for row in rows]
        print(f"{name:19s} offset error median {statistics.median(values):+7.1f} us"
              f"  mean {statistics.mean(values):+7.1f} us  sd {statistics.stdev(values):6.1f} us"
              f"  ({len(values)} exchanges)")


if __name__ == "__main__":
    main()
