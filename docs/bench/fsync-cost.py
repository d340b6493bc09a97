#!/usr/bin/env python3
"""CPU and wall time per sync: appending to a new (sparse) file, as fjall's
journal does, against overwriting a pre-allocated, pre-zeroed file, which is
what a log-first writer would do. Run it in a directory on the disk under
test (it writes four files of about 4 MiB there and leaves them).
Measured figures: BENCHMARKS.md, "On a quiet machine"."""
import os
import resource
import time

SYNCS = 2000
RECORD = b"x" * 2048


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name, preallocate, sync):
    path = f"fsync-cost-{name}"
    if os.path.exists(path):
        os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if preallocate:
        os.write(fd, b"\0" * (SYNCS * len(RECORD) + 4096))
        os.fsync(fd)
    cpu, wall = cpu_seconds(), time.time()
    for i in range(SYNCS):
        os.pwrite(fd, RECORD, i * len(RECORD))
        sync(fd)
    cpu, wall = cpu_seconds() - cpu, time.time() - wall
    os.close(fd)
    print(f"{name}: {cpu / SYNCS * 1e6:.1f} us CPU, {wall / SYNCS * 1e6:.0f} us wall per sync")


measure("append-fsync", False, os.fsync)
measure("append-fdatasync", False, os.fdatasync)
measure("preallocated-fdatasync", True, os.fdatasync)
measure("preallocated-fsync", True, os.fsync)
