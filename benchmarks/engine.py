"""Run the xms copy engine once, as its own process (so its peak RSS can be measured), and print
its statistics as JSON. Used by benchmarks/run.py; handy alone too:

    python -m benchmarks.engine SRC DST [--dst-file] [--src-image FMT] [--bitmap NAME] [--qos-bps N] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from activities import copyengine
from activities.transport import nbd as transport
from xms.models import TargetEndpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--src-image", metavar="FMT", help="SRC is a local image of this format (served by qemu-nbd)")
    p.add_argument("--dst-file", action="store_true", help="DST is a raw file, written with pwrite")
    p.add_argument("--bitmap", help="copy only the extents dirty in this bitmap (an incremental sync)")
    p.add_argument("--qos-bps", type=int, default=0)
    p.add_argument("--depth", type=int, default=copyengine.DEPTH)
    p.add_argument("--threads", type=int, default=copyengine.THREADS, help="threads driving the connections")
    p.add_argument("--request-kib", type=int, default=0, help="copy request size (default: as xms chooses for the target)")
    p.add_argument("--nbd-flush-mib", type=int, default=copyengine.NBD_FLUSH_EVERY >> 20,
                   help="NBD target: a background flush every N MiB written per connection (0: only the final flush)")
    p.add_argument("--file-writeback-mib", type=int, default=copyengine.FILE_WRITEBACK_EVERY >> 20,
                   help="file target: start writeback every N MiB written per writer (0: only the final fdatasync)")
    p.add_argument("--connections", type=int, default=0, help="default: as the xms worker chooses")
    p.add_argument("--repeat", type=int, default=1,
                   help="copy N times in this one process, one JSON line each: the second and later run "
                        "warm, as a worker's later syncs do")
    a = p.parse_args(argv)
    copyengine.NBD_FLUSH_EVERY = (a.nbd_flush_mib << 20) or 1 << 62
    copyengine.FILE_WRITEBACK_EVERY = (a.file_writeback_mib << 20) or 1 << 62
    for _ in range(a.repeat):
        json.dump(run(a), sys.stdout)
        print(flush=True)
    return 0


def run(a: argparse.Namespace) -> dict:
    kind = "image" if a.src_image else "nbd"
    t0 = time.monotonic()
    src = transport.connect(a.src, kind, a.src_image or "raw", bitmap=a.bitmap)
    t_conn = time.monotonic()
    size = src.get_size()
    if a.bitmap:
        plan = list(transport.dirty_extents(src, a.bitmap, size))
    else:
        plan = [e for e in transport.extents(src, 0, size)]
    allocated = sum(e.length for e in plan if not e.zero)
    t_plan = time.monotonic()
    target = TargetEndpoint(kind="file", path=a.dst, size=size) if a.dst_file else TargetEndpoint(kind="nbd", uri=a.dst, size=size)
    writer = copyengine.open_writer(target)
    n = a.connections or copyengine.connections_for(allocated if not a.bitmap else sum(e.length for e in plan))
    more = [(transport.connect(a.src, kind, a.src_image or "raw", bitmap=a.bitmap, private=True),
             copyengine.open_writer(target))
            for _ in range(n - 1)]
    t_more = time.monotonic()
    stats = copyengine.copy(src, plan, writer, more=more, fresh=not a.bitmap, depth=a.depth,
                            throttle=copyengine.Throttle(a.qos_bps), threads=a.threads,
                            request=a.request_kib * 1024 or None)
    for h, w in [(src, writer), *more]:
        w.close()
        transport.close(h)
    t_end = time.monotonic()
    elapsed = t_end - t0
    return {
        "size": size, "allocated": allocated, "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written,
        "zero_bytes_written": stats.zero_bytes_written, "copy_s": stats.elapsed, "elapsed_s": elapsed,
        "extents": len(plan), "connections": n,
        "phases_s": {"connect": t_conn - t0, "plan": t_plan - t_conn, "more_connections": t_more - t_plan,
                     "copy": stats.elapsed, "close": t_end - t_more - stats.elapsed},
    }


if __name__ == "__main__":
    sys.exit(main())
