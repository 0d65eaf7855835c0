"""The kernel's readahead on our mount: the FUSE bdi's read_ahead_kb, raised once INIT is done.

A FUSE mount gets a bdi of its own with the kernel's default readahead, 128 KiB, and INIT can
only lower it (the kernel keeps the smaller of its value and the reply's max_readahead). So a cold
sequential read came as requests of 64-128 KiB, ~15,000 round trips a GiB, where the largest
request we take is 1 MiB (max_pages 256). Root raises it in sysfs, as ``blockdev --setra`` would
for a disk: to 1 MiB, or to the readahead of the layers' disks where that is more, which is what
the kernel's overlayfs reads ahead with (it reads the layer files themselves).
"""

import logging
import os
import re

log = logging.getLogger("unionfs.readahead")

# At least one window of one request of the Cython session's largest size (its max_pages).
READ_AHEAD_KB = 1024


def mount_dev(mountpoint):
    """``major:minor`` of the newest mount on ``mountpoint``, from /proc/self/mountinfo (a stat
    would be a request to the daemon, which may be the caller)."""
    found = None
    want = os.fsencode(mountpoint)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
            if point == want:
                found = fields[2].decode()
    return found


def layer_readahead_kb(st_dev):
    """read_ahead_kb of the disk under a layer's filesystem (a partition's is its disk's); 0 where
    there is none (tmpfs, an overlay, a network filesystem)."""
    base = f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}"
    for path in (f"{base}/bdi/read_ahead_kb", f"{base}/../bdi/read_ahead_kb"):
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            pass
    return 0


def raise_readahead(mountpoint, stack):
    """Raise the readahead of the FUSE mount on ``mountpoint`` to what the layers of ``stack``
    (a LayerStack) get from their disks, and at least READ_AHEAD_KB (never lower it). Only after
    the kernel has our INIT reply, which would lower it again. Whether it is set: a user
    without root cannot, and keeps the default."""
    layers = [layer for layer in (stack.upper, *stack.lowers) if layer is not None]
    kib = max([READ_AHEAD_KB] + [layer_readahead_kb(layer.st_dev) for layer in layers])
    dev = mount_dev(mountpoint)
    if dev is None:
        log.debug("readahead: %s is not a mount point", mountpoint)
        return False
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path) as f:
            if int(f.read()) >= kib:
                return True
        with open(path, "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.debug("readahead of %s stays at the kernel's default: %s", mountpoint, e.strerror)
        return False
    log.debug("readahead of %s: %d KiB", mountpoint, kib)
    return True
