"""Whether any process still has a file open for writing.

A hot folder knows a file is complete when its writer closes it (an
inotify close-after-write event) or renames it into place. Where it can only
guess (files found at start, by a rescan, or by polling), a file that held
still for a few seconds may still be open by a writer that paused: this
module asks the kernel instead, so the guess is a fact wherever the platform
can tell.

Two ways, tried in order (Linux):

- **a read lease** (``fcntl(F_SETLEASE, F_RDLCK)``): the kernel grants it
  only when no process has the file open for writing, and refuses with
  ``EAGAIN`` otherwise. It is released at once. It needs the file's owner or
  ``CAP_LEASE`` (root has it).
- **/proc**: every process's open descriptors, and the access mode of those
  naming the file (``/proc/PID/fdinfo``). Complete only when this user can
  see every process's descriptors (root, or a writer running as this user).

Neither sees writers on other machines: on a network file system (NFS, SMB,
FUSE mounts and the like) the answer is always "cannot tell", and the hot
folder falls back to a longer settle time.

    >>> check = WriteCheck("/srv/parts")
    >>> check.busy(Path("/srv/parts/part-0001.png"))   # True, False, or None: cannot tell
    False
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)

#: File system types whose writers may sit on another machine (``/proc/self/mountinfo`` names).
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "ocfs2", "gfs2", "davfs", "coda", "fuse", "fuseblk", "virtiofs", "vboxsf", "vmhgfs", "beegfs",
})

# Linux's F_SETSIG (not exported by every Python): the signal a lease break sends. SIGURG, ignored by
# default, instead of SIGIO, which would end the process if a writer opened the file during the check.
_F_SETSIG = 10
_O_ACCMODE = 0o3


def mount_fstype(path: str | os.PathLike) -> str | None:
    """The file system type of the mount holding ``path``, from ``/proc/self/mountinfo``; None if unknown."""
    target = os.path.realpath(path)
    best, fstype = -1, None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
            for text in handle:
                fields = text.split()
                if "-" not in fields:
                    continue
                point = fields[4].encode().decode("unicode_escape")  # \040 for spaces
                dash = fields.index("-")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) > best:
                    best, fstype = len(point), fields[dash + 1]
    except OSError:
        return None
    return fstype


class WriteCheck:
    """Ask whether a file in ``folder`` is open for writing by any process.

    Args:
        folder: the folder whose files are checked (its mount decides
            whether the answer can be known at all).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.fstype = mount_fstype(folder) if sys.platform.startswith("linux") else None
        fstype = (self.fstype or "").split(".")[0]
        self.remote = fstype in NETWORK_FS or fstype.startswith("fuse")
        self._lease = sys.platform.startswith("linux") and not self.remote
        self._said: set[str] = set()

    @property
    def can_tell(self) -> bool:
        """False where no local check can see every writer (not Linux, or a network file system)."""
        return sys.platform.startswith("linux") and not self.remote

    def busy(self, path: Path, *, scan: bool = True) -> bool | None:
        """True when some process has ``path`` open for writing, False when none has, None when it cannot tell.

        ``scan=False`` asks the file lease only (a few system calls) and
        answers None where no lease can be taken, instead of reading every
        process's descriptors in /proc (milliseconds): for a check made on
        every file read.
        """
        if not self.can_tell:
            return None
        answer = self._by_lease(path)
        if answer is None and scan:
            answer = self._by_proc(path)
        return answer

    def _once(self, key: str, message: str, *args) -> None:
        if key not in self._said:
            self._said.add(key)
            log.info(message, *args)

    def _by_lease(self, path: Path) -> bool | None:
        import fcntl

        if not self._lease:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            try:
                fcntl.fcntl(fd, _F_SETSIG, signal.SIGURG)
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return True
                if exc.errno in (errno.EACCES, errno.EPERM):
                    self._once("lease-perm", "Hot folder %s: cannot take file leases on files of other owners (no "
                               "CAP_LEASE); telling open writers apart through /proc instead", self.folder)
                else:
                    self._lease = False
                    self._once("lease", "Hot folder %s: file leases are not supported here (%s); telling open "
                               "writers apart through /proc instead", self.folder, exc.strerror or exc)
                return None
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            return False
        finally:
            os.close(fd)

    def _by_proc(self, path: Path) -> bool | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        target = (st.st_dev, st.st_ino)
        complete = True
        try:
            pids = [name for name in os.listdir("/proc") if name.isdigit()]
        except OSError:
            return None
        if "1" not in pids:
            # /proc mounted with hidepid or ProtectProc=invisible: other users' processes are absent, not idle.
            complete = False
        for pid in pids:
            folder = f"/proc/{pid}/fd"
            try:
                fds = os.listdir(folder)
            except FileNotFoundError:
                continue  # the process ended
            except OSError:
                complete = False  # another user's process: its descriptors are hidden
                continue
            for fd in fds:
                try:
                    fst = os.stat(f"{folder}/{fd}")
                except OSError:
                    continue
                if (fst.st_dev, fst.st_ino) != target:
                    continue
                try:
                    with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as handle:
                        flags = next(int(line.split()[1], 8) for line in handle if line.startswith("flags:"))
                except (OSError, StopIteration, ValueError):
                    continue
                if flags & _O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                    return True
        if not complete:
            self._once("proc", "Hot folder %s: this user cannot see every process's open files, so a writer that "
                       "pauses cannot be told from a finished file; files found without a close event wait for "
                       "the longer settle time", self.folder)
            return None
        return False
