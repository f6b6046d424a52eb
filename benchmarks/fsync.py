"""What the node's durable path costs on a file system: one instance's fsyncs.

Run from the repository root, pointing at the file system the store lives on::

    .venv/bin/python benchmarks/fsync.py [--dir ./pacs-node-data] [--count 200] [--size-kb 526]

For ``--count`` new files of ``--size-kb`` (a 512x512 CT instance is 526 KB) it
does what :meth:`storage.filestore.FileStore.acknowledge` does after the bytes
are written (fdatasync of the file, rename into a journal folder, fsync of that
folder) and prints the median milliseconds of each step, with the write itself
for scale, and a JSON line ``{"benchmark": "fsync", ...}``. Everything it writes
is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dir", default=".", help="a folder on the store's file system (default: here)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size-kb", type=int, default=526)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacs-node-fsync-", dir=args.dir))
    journal = work / "acked"
    journal.mkdir()
    data = os.urandom(args.size_kb * 1024)
    steps: dict[str, list[float]] = {"write": [], "fdatasync": [], "rename + folder fsync": []}
    try:
        folder = os.open(journal, os.O_RDONLY)
        try:
            for i in range(args.count):
                tmp = work / f"{i}.part"
                t0 = time.perf_counter()
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                    t1 = time.perf_counter()
                    os.fdatasync(fd)
                    t2 = time.perf_counter()
                finally:
                    os.close(fd)
                os.rename(tmp, journal / f"{i}.dcm")
                os.fsync(folder)
                t3 = time.perf_counter()
                steps["write"].append(t1 - t0)
                steps["fdatasync"].append(t2 - t1)
                steps["rename + folder fsync"].append(t3 - t2)
        finally:
            os.close(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: round(1000 * statistics.median(values), 3) for name, values in steps.items()}
    for name, ms in medians.items():
        print(f"{name:24s} {ms:7.3f} ms (median of {args.count}, {args.size_kb} KB files)")
    print(json.dumps({"benchmark": "fsync", "size_kb": args.size_kb, "count": args.count, "median_ms": medians}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
