"""One run per --save directory.

Two runs saving into one directory interleave silently: a checkpoint could hold one run's model
and the other's optimizer, and load without complaint. The first run to start takes
`DIR/megalm.lock` (created exclusively, holding its host, pid and start time); a second run is
refused with a message naming the holder.

A lock whose holder is gone is stale and taken over: on the holder's own host, when its pid no
longer runs (kill -9, an out-of-memory kill); anywhere, when its heartbeat (the file's
modification time, refreshed every HEARTBEAT_SECONDS by a daemon thread of the holder) is older
than STALE_SECONDS, which covers a job requeued on another node after its first node died.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

from megalm.checkpoint.files import CheckpointError

LOCK_NAME = "megalm.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


def _holder(path: str) -> Optional[dict]:
    """The lock file's content, {} when unreadable (being written), None when it does not exist."""
    try:
        with open(path) as f:
            text = f.read()
        age = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = {}
    return dict(holder if isinstance(holder, dict) else {}, age=age)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(holder: dict, stale_seconds: float = STALE_SECONDS) -> Optional[str]:
    """Why the run that holds the lock is gone, or None while it may still be running."""
    same_host = holder.get("host") == socket.gethostname()
    pid = holder.get("pid")
    if same_host and pid == os.getpid():
        return "this process took it earlier"
    if same_host and isinstance(pid, int) and not _pid_alive(pid):
        return f"process {pid} on this host no longer runs"
    if holder.get("age", 0.0) > stale_seconds:
        return f"its heartbeat stopped {holder['age']:.0f} s ago"
    return None


class SaveDirLock:
    """`with SaveDirLock(dir):`, or `acquire()` / `release()`; a no-op for `root=None`."""

    def __init__(self, root: Optional[str], log=print, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 stale_seconds: float = STALE_SECONDS):
        self.root, self.log = root, log
        self.path = os.path.join(root, LOCK_NAME) if root else None
        self.heartbeat_seconds, self.stale_seconds = heartbeat_seconds, stale_seconds
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False

    def acquire(self) -> "SaveDirLock":
        if self.path is None or self.held:
            return self
        os.makedirs(self.root, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):  # a takeover can race with another run's: try again from the top
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                if holder is None:
                    continue  # released between our two calls
                reason = stale_reason(holder, self.stale_seconds)
                if reason is None:
                    raise CheckpointError(self._in_use(holder))
                self._take_over(holder, reason)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            self._thread = threading.Thread(target=self._beat, name="megalm-save-lock", daemon=True)
            self._thread.start()
            return self
        raise CheckpointError(f"could not take {self.path}: other runs keep taking it; is the directory shared "
                              f"by several jobs?")

    def _take_over(self, holder: dict, reason: str) -> None:
        """Move the stale lock aside (a rename succeeds for one run only), then check that what was
        moved is the lock judged stale, not a new holder's that replaced it meanwhile."""
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        moved = _holder(aside) or {}
        if (moved.get("host"), moved.get("pid")) != (holder.get("host"), holder.get("pid")):
            os.replace(aside, self.path)
            raise CheckpointError(self._in_use(moved))
        os.remove(aside)
        if reason != "this process took it earlier":
            self.log(f"note: took over the lock of {self.root} from {holder.get('host')} pid {holder.get('pid')} "
                     f"({reason})")

    def _in_use(self, holder: dict) -> str:
        return (f"{self.root} is in use by another run (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
                f"started {holder.get('started', '?')}, last heartbeat {holder.get('age', 0):.0f} s ago): two runs "
                f"saving into one directory would mix their checkpoints. Give this run another --save directory, "
                f"or stop the other one; if it is gone, delete {self.path}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                os.utime(self.path)
            except OSError:  # the directory was removed under us: nothing left to protect
                return

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = _holder(self.path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            os.remove(self.path)
        self.held = False

    def __enter__(self) -> "SaveDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
