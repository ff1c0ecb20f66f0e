"""One run per output_dir, and an overwrite that loses nothing until the new run has saved.

The lock: the main process of a run (process_index 0) holds ``fcntl.flock`` on ``output_dir/.dualadam-run.lock``
for the whole run and writes its pid, host and start time into it; a second run into the same output_dir is
refused in one line naming them. The OS releases the lock when the holder dies, ``kill -9`` included, so
nothing stale blocks the next run. On a clean exit the file is removed; a run that takes the lock checks that
the file it locked is still the one at that path, so removing it cannot let two runs in.

flock is not reliable on every network file system: NFSv4 and recent Linux NFSv3 clients emulate it with
byte-range locks that do reach other machines, but Lustre mounted with ``localflock``, some FUSE file
systems and older NFS setups lock within one machine only, and a few refuse flock altogether. Where flock
fails with an error the run goes ahead unguarded and says so in a warning; where it silently locks this
machine only, a run started on another machine is not kept out. A lock file still naming a run on another
host when we take the lock is the one sign of that, and is warned about. On such file systems give each run
its own output_dir.

The swap: with ``overwrite_output_dir`` every entry of output_dir (the lock file aside) is moved, by renames,
into ``output_dir/.previous-run`` when the run starts. The first save of the new run (a checkpoint published,
or the final model saved) renames that folder to ``.previous-run.discarded`` and removes it; a run that stops
before its first save removes whatever it wrote and moves the previous run back, byte-identical. A run killed
before its first save leaves ``.previous-run`` behind: pre-flight lists it as a run already there, and the
next overwrite puts it back before setting it aside again, so it is never lost silently.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_FILE = ".dualadam-run.lock"
ASIDE = ".previous-run"
# the aside folder is renamed to this before it is removed: a kill during the removal leaves no half of the
# previous run under a name that the next run would move back
DISCARDED = ".previous-run.discarded"
# a pre-flight probe (``holder``) holds the lock for an instant; taking it retries for this long before refusing
TAKE_SECONDS = 1.0
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputDirInUse(ValueError):
    """Another run holds output_dir's lock; the message names it."""


def holder(output_dir: str | Path) -> str | None:
    """Who holds output_dir's lock ("pid 123 on host, started ..."), or None when no run does. Writes nothing,
    for pre-flight and dry runs."""
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(path)
    except OSError:
        return None  # no flock on this file system: nothing to ask
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def in_use_message(output_dir: str | Path, who: str) -> str:
    return (f"output_dir {output_dir} is in use by another run ({who}); wait for it to finish or choose another "
            "output_dir")


def _describe(path: Path) -> str:
    try:
        record = json.loads(path.read_text())
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its lock file {path} does not say which (it may be starting)"


def entries(directory: Path) -> list[Path]:
    """What output_dir holds besides the lock and the folders of a set-aside run."""
    return [path for path in directory.iterdir() if path.name not in (LOCK_FILE, ASIDE, DISCARDED)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class RunDirectory:
    """output_dir as held by the main process of one run: locked, and with the previous run set aside when
    the run overwrites it. ``take`` it before the run, call ``saved`` after each save, ``release`` at the end."""

    def __init__(self, output_dir: Path, created: list[Path], fd: int | None) -> None:
        self.output_dir, self._created, self._fd = output_dir, created, fd
        self.aside: Path | None = None  # the previous run, until this run has saved

    @classmethod
    def take(cls, output_dir: str | Path, *, set_aside: bool) -> RunDirectory:
        """Create output_dir if needed, lock it (``OutputDirInUse`` if another run has it) and, with
        ``set_aside``, move every entry it holds into ``.previous-run``."""
        output_dir = Path(output_dir)
        created = [path for path in (output_dir, *output_dir.parents) if not path.exists()]
        output_dir.mkdir(parents=True, exist_ok=True)
        directory = cls(output_dir, created, None)
        try:
            directory._fd = directory._lock()
            if directory._fd is not None:
                directory._record_holder()
            if (output_dir / DISCARDED).exists():  # a kill while removing a set-aside run: finish the removal
                shutil.rmtree(output_dir / DISCARDED)
            if set_aside:
                directory._set_aside()
        except BaseException:
            directory.release()
            raise
        return directory

    def _lock(self) -> int | None:
        path = self.output_dir / LOCK_FILE
        deadline = time.monotonic() + TAKE_SECONDS
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise OutputDirInUse(in_use_message(self.output_dir, _describe(path))) from None
                time.sleep(0.05)
                continue
            except OSError as error:
                os.close(fd)
                if error.errno not in NO_FLOCK:
                    raise
                path.unlink(missing_ok=True)
                logger.warning("output_dir %s: this file system does not support flock (%s); a second run into it "
                               "is not refused", self.output_dir, error.strerror)
                return None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the holder removed the file between our open and our lock: lock the new one

    def _record_holder(self) -> None:
        path = self.output_dir / LOCK_FILE
        previous = path.read_text().strip()
        if previous:  # left by a holder that did not exit cleanly: killed, or on a machine our lock does not reach
            try:
                other_host = json.loads(previous).get("host") not in (None, socket.gethostname())
            except (ValueError, AttributeError):
                other_host = False
            if other_host:
                logger.warning("output_dir %s: its lock file names a run on another machine (%s) that did not "
                               "release it; if that run is alive, this file system's locks do not reach across "
                               "machines and the two runs now share output_dir", self.output_dir, _describe(path))
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (record + "\n").encode(), 0)

    def _set_aside(self) -> None:
        aside = self.output_dir / ASIDE
        if aside.exists():  # a run killed before its first save set this one aside: put it back first
            self._put_back()
        previous = entries(self.output_dir)
        if not previous:
            return
        aside.mkdir()
        try:
            for path in previous:
                path.rename(aside / path.name)
        except BaseException:  # stopped half-way: move back what moved (nothing of this run exists yet)
            for path in aside.iterdir():
                path.rename(self.output_dir / path.name)
            aside.rmdir()
            raise
        self.aside = aside

    def _put_back(self) -> None:
        """Remove what this run wrote and move the previous run back into output_dir."""
        aside = self.output_dir / ASIDE
        for path in entries(self.output_dir):
            _remove(path)
        for path in list(aside.iterdir()):
            path.rename(self.output_dir / path.name)
        aside.rmdir()

    def saved(self) -> None:
        """This run has saved (a checkpoint, or the final model): the previous run it set aside goes."""
        if self.aside is None:
            return
        discarded = self.output_dir / DISCARDED
        self.aside.rename(discarded)
        self.aside = None
        shutil.rmtree(discarded)

    def release(self) -> None:
        """Put the previous run back if this run never saved, unlock, and remove what ``take`` created and
        nothing filled (the lock file; output_dir and its parents when they are empty)."""
        try:
            if self.aside is not None:  # (said once, in pre-flight's note: the error stays the one line)
                self._put_back()
                self.aside = None
        finally:
            if self._fd is not None:
                (self.output_dir / LOCK_FILE).unlink(missing_ok=True)  # before unlocking: see _lock
                os.close(self._fd)
                self._fd = None
            for path in self._created:
                try:
                    path.rmdir()
                except OSError:  # not empty: the run wrote something there
                    break


_held: RunDirectory | None = None


def hold(args: Any, *, set_aside: bool) -> RunDirectory:
    """Take output_dir for this process's run (the main process's); ``mark_saved`` and ``let_go`` act on it."""
    global _held
    _held = RunDirectory.take(args.output_dir, set_aside=set_aside)
    return _held


def mark_saved() -> None:
    """Called after each save of the run this process holds (none: nothing to do)."""
    if _held is not None:
        _held.saved()


def let_go() -> None:
    global _held
    if _held is not None:
        held, _held = _held, None
        held.release()
