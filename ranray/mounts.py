"""Which file system a path lives on, read from the mount table (/proc/self/mounts).

SQLite's locking is unreliable on network file systems (its own documentation says so): a
database there can be corrupted by writers on two hosts, or fail with "database is locked". The
tracking store and the tracking server refuse such a place (ranray.tracking_access).

The table is a parameter, so a test can describe an NFS mount that this machine does not have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MOUNT_TABLE = Path("/proc/self/mounts")

# Types whose files other hosts write too (or whose locks are advisory at best).
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "virtiofs", "lustre", "gpfs",
    "beegfs", "glusterfs", "fuse.glusterfs", "ceph", "fuse.ceph", "fuse.sshfs", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.juicefs", "fuse.mountpoint-s3", "fuse.rclone", "fuse.efs", "efs",
})


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str

    @property
    def network(self) -> bool:
        return self.fstype in NETWORK_FILESYSTEMS


def parse_mount_table(text: str) -> list[Mount]:
    """Lines of `source mountpoint fstype options dump pass`; spaces in paths are octal escapes."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append(Mount(_unescape(fields[1]), fields[2], _unescape(fields[0])))
    return mounts


def mount_of(path: str | os.PathLike, table: str | None = None) -> Mount | None:
    """The mount holding `path` (the longest mount point above it; the last one mounted wins).
    A path that does not exist yet is judged by where it would be made."""
    text = MOUNT_TABLE.read_text() if table is None else table
    target = _existing(Path(path).expanduser().absolute())
    best: Mount | None = None
    for mount in parse_mount_table(text):
        point = mount.mountpoint.rstrip("/") or "/"
        inside = point == "/" or target == point or target.startswith(point + "/")
        if inside and (best is None or len(point) >= len(best.mountpoint.rstrip("/") or "/")):
            best = mount
    return best


def _existing(path: Path) -> str:
    """`path` with the symlinks of its existing part resolved; the part not made yet kept as is."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return str(candidate.resolve() / path.relative_to(candidate))
    return str(path)


def _unescape(field: str) -> str:
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field
