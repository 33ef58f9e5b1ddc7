"""Exactly-once runs: an atomic claim on a run directory, its heartbeat, failure markers.

Every launcher (serial, worker processes, Slurm job arrays, Ray tasks) claims a run directory
before it trains into it. The claim is the file ``claim.lock``, created with
``os.open(O_CREAT | O_EXCL)`` so that of several processes only one can create it. It holds the
owner (host, pid, the process's start time, Slurm / Ray job id, launcher), when the claim was
taken, a ``heartbeat`` time that a background thread refreshes while the run trains, and the
last step the run reported. Another launcher meeting the file

* skips the run while the claim is **live**;
* takes it over when it is **stale**: its owner was a process on this host that no longer
  exists, its heartbeat is older than the owner's :attr:`ClaimPolicy.expire_s`, or it was left
  by an earlier attempt of the same cluster job (a requeued Slurm job keeps its job id).

A takeover is itself exclusive: the contender first creates ``.claim.takeover-<token>`` for the
stale claim's token (again ``O_EXCL``), so of several processes that find the same stale claim
one replaces it. An owner whose heartbeat finds the file no longer holds its token has lost the
claim (:attr:`RunClaim.lost`); the runner then stops the run at the next step.

A run that raises leaves ``failed.json`` (error, traceback, owner, attempt number); the next
invocation retries it and a success removes the marker. ``run.log`` collects, per attempt, who
ran it and the trainer's log lines, so ``normlab status`` can show the end of a failed run's log.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.train import atomic_write_text

__all__ = [
    "FAILED",
    "LOCK",
    "RUN_LOG",
    "ClaimLostError",
    "ClaimPolicy",
    "RunClaim",
    "clear_failure",
    "describe_owner",
    "owner_identity",
    "read_claim",
    "read_failure",
    "record_failure",
    "run_log_writer",
    "stale_reason",
    "tail",
]

LOCK = "claim.lock"
FAILED = "failed.json"
RUN_LOG = "run.log"


class ClaimLostError(RuntimeError):
    """The claim on a run directory was taken over by another launcher while this one trained."""


@dataclass(frozen=True)
class ClaimPolicy:
    """How often an owner refreshes its claim, and after how long without a refresh a claim of a
    process on another host counts as abandoned (seconds)."""

    heartbeat_s: float = 30.0
    expire_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("heartbeat_s", "expire_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"ClaimPolicy.{name}: expected a positive number, got {v!r}")
        if self.expire_s <= self.heartbeat_s:
            raise ValueError(
                f"ClaimPolicy.expire_s ({self.expire_s}) must exceed heartbeat_s "
                f"({self.heartbeat_s}): a live owner would look abandoned between two heartbeats"
            )


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid
    from the original process; ``None`` where ``/proc`` cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 of proc(5), counted after "(comm)"


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


def owner_identity(job_id: str = "", launcher: str = "serial") -> dict[str, Any]:
    """This process as the owner of a claim: host, pid, its start time, job id, launcher."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _process_start(pid),
        "job_id": job_id,
        "launcher": launcher,
    }


def read_claim(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The claim of ``run_dir``: ``None`` without one, ``{"unreadable": True, "mtime": ...}``
    while its owner is still writing it (or for a damaged file)."""
    p = Path(run_dir) / LOCK
    try:
        text = p.read_text(encoding="utf-8")
        mtime = p.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        if not isinstance(info, dict) or "token" not in info:
            raise ValueError(text)
    except ValueError:
        return {"unreadable": True, "mtime": mtime, "heartbeat": mtime}
    return info


def stale_reason(
    info: dict[str, Any], me: dict[str, Any], policy: ClaimPolicy, now: float | None = None
) -> str | None:
    """Why the claim ``info`` may be taken over by ``me`` (see the module docstring), or
    ``None`` while it is live."""
    now = time.time() if now is None else now
    age = now - float(info.get("heartbeat", 0.0))
    expire = float(info.get("expire_s") or policy.expire_s)  # the owner's, when it wrote one
    if info.get("unreadable"):
        return f"unreadable and {age:.0f} s old" if age > expire else None
    if info.get("job_id") and info["job_id"] == me.get("job_id"):
        return f"left by an earlier attempt of job {info['job_id']}"
    if info.get("host") == me.get("host"):
        if info.get("pid") == me.get("pid"):
            return None if info.get("token") in _HELD else "left by this process"
        if not _alive(int(info.get("pid", -1)), info.get("pid_start")):
            return f"its process {info.get('pid')} on {info.get('host')} has ended"
    if age > expire:
        return f"no heartbeat for {age:.0f} s (expiry {expire:g} s)"
    return None


_HELD: set[str] = set()  # the tokens of the claims this process holds now


def _takeover_marker(run_dir: Path, token: str) -> Path:
    return run_dir / f".claim.takeover-{token}"


class RunClaim:
    """The claim of one run directory by this process (see the module docstring).

    Args:
        run_dir: the run directory (created if missing).
        job_id: the cluster job this process belongs to (``""``: none).
        launcher: recorded for ``normlab status``.
        policy: heartbeat interval and expiry.

    Example::

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with RunClaim(d) as claim:
        ...     claim.acquired, RunClaim(d, job_id="other").acquire()
        (True, False)
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        job_id: str = "",
        launcher: str = "serial",
        policy: ClaimPolicy | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.policy = policy or ClaimPolicy()
        self.me = owner_identity(job_id, launcher)
        self.token = uuid.uuid4().hex
        self.acquired = False
        self.holder: dict[str, Any] | None = None  # the live owner that kept us out
        self.took_over: str | None = None  # why the claim we replaced was stale
        self.lost = threading.Event()
        self.step: int | None = None
        self.total_steps: int | None = None
        self._since = _now_iso()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the lock file

    def _record(self) -> dict[str, Any]:
        return {
            "token": self.token,
            **self.me,
            "since": self._since,
            "heartbeat": time.time(),
            "step": self.step,
            "total_steps": self.total_steps,
            "expire_s": self.policy.expire_s,
        }

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self._record()))
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _take_over(self, info: dict[str, Any], reason: str) -> bool | None:
        """Replace the stale claim ``info``: ``True`` done, ``False`` another contender is doing
        it, ``None`` the claim changed meanwhile (look again)."""
        token = str(info.get("token", "unreadable"))
        marker = _takeover_marker(self.run_dir, token)
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(OSError):  # a contender that died mid-takeover
                if time.time() - marker.stat().st_mtime > self.policy.expire_s:
                    marker.unlink()
                    return None
            return False
        try:
            now = read_claim(self.run_dir)
            if now is None or now.get("token", "unreadable") != token:
                return None
            if stale_reason(now, self.me, self.policy) is None:
                return None  # its owner came back to life
            atomic_write_text(self.path, json.dumps(self._record()))
            self.took_over = reason
            return True
        finally:
            marker.unlink(missing_ok=True)

    def acquire(self) -> bool:
        """Take the claim: ``True`` if this process owns it now (a heartbeat thread then keeps
        it fresh), ``False`` if a live owner (:attr:`holder`) or a contender has it."""
        if self.acquired:
            return True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                break
            info = read_claim(self.run_dir)
            if info is None:
                continue  # released meanwhile
            reason = stale_reason(info, self.me, self.policy)
            if reason is None:
                self.holder = info
                return False
            done = self._take_over(info, reason)
            if done is False:
                self.holder = info
                return False
            if done:
                break
        else:
            return False
        self.acquired = True
        _HELD.add(self.token)
        self._thread = threading.Thread(target=self._beat, name="normlab-claim", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.policy.heartbeat_s):
            self.refresh()
            if self.lost.is_set():
                return

    def refresh(self) -> None:
        """Write a fresh heartbeat (and the last step), or set :attr:`lost` when the file holds
        another owner's token. The heartbeat thread calls it; a transient I/O error is retried
        at the next beat."""
        if not self.acquired:
            return
        try:
            info = read_claim(self.run_dir)
            if info is None or info.get("token") != self.token:
                self.lost.set()
                return
            atomic_write_text(self.path, json.dumps(self._record()))
        except OSError:
            pass

    def progress(self, step: int, total_steps: int | None = None) -> None:
        """The run's last step, written with the next heartbeat."""
        self.step, self.total_steps = step, total_steps

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file, if it is still ours."""
        if not self.acquired:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self.acquired = False
        _HELD.discard(self.token)
        with contextlib.suppress(OSError):
            info = read_claim(self.run_dir)
            if info is not None and info.get("token") == self.token:
                self.path.unlink()

    def __enter__(self) -> RunClaim:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_owner(info: dict[str, Any]) -> str:
    """``host pid 123 (job 55_2, slurm)`` for a claim record."""
    if info.get("unreadable"):
        return "an owner still writing its claim"
    extra = ", ".join(
        x for x in (info.get("job_id") and f"job {info['job_id']}", info.get("launcher")) if x
    )
    return f"{info.get('host')} pid {info.get('pid')}" + (f" ({extra})" if extra else "")


# ---------------------------------------------------------------------------------- failures


def read_failure(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``failed.json`` record of ``run_dir``, or ``None``."""
    p = Path(run_dir) / FAILED
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def record_failure(
    run_dir: str | os.PathLike[str], error: BaseException, owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``failed.json`` for ``error`` (raised in the current ``except`` block); returns
    the record. ``attempt`` counts the failures in a row."""
    prev = read_failure(run_dir) or {}
    rec = {
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc(),
        "time": _now_iso(),
        "attempt": int(prev.get("attempt", 0)) + 1,
        "owner": owner or owner_identity(),
    }
    atomic_write_text(Path(run_dir) / FAILED, json.dumps(rec, indent=2) + "\n")
    return rec


def clear_failure(run_dir: str | os.PathLike[str]) -> None:
    """Remove the failure marker (after a successful attempt)."""
    (Path(run_dir) / FAILED).unlink(missing_ok=True)


def run_log_writer(run_dir: str | os.PathLike[str]) -> Callable[[str], None]:
    """A ``log`` function that appends time-stamped lines to ``run_dir/run.log``."""
    path = Path(run_dir) / RUN_LOG

    def write(msg: str) -> None:
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as fh:
            fh.writelines(f"{stamp}  {line}\n" for line in str(msg).splitlines() or [""])

    return write


def tail(path: str | os.PathLike[str], n: int = 10) -> list[str]:
    """The last ``n`` lines of a text file (``[]`` when it does not exist)."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return lines[-n:]
