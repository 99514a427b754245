"""Who owns a job, and whether that owner is provably gone.

``host:pid`` is no identity: containers share a host name, a process in its own PID namespace is
pid 1 or some small number that means another process outside it, and pids are reused. An owner
therefore names its host, its boot (``/proc/sys/kernel/random/boot_id``), its PID namespace (the
inode of ``/proc/self/ns/pid``), its pid and the process's start time, plus a random token per run.

An owner is *dead* only when host, boot and namespace all match ours and its process is gone, is a
zombie, or is another process under a reused pid. It is *alive* when that same process still runs
(not stopped: a SIGSTOPped or paused process holds no work forward, so its lease decides). Any
other owner (another machine, another container, another boot, an owner string from an older
version) is *unknown*: only its lease expiry can tell.
"""

from __future__ import annotations

import os
import socket

DEAD, ALIVE, UNKNOWN = "dead", "alive", "unknown"
_SEP = ":"


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("ascii", "replace").strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _clean(text: str) -> str:
    return text.replace(_SEP, "_") or "0"


HOSTNAME = socket.gethostname()
HOST = _clean(HOSTNAME)
BOOT = _clean(_read("/proc/sys/kernel/random/boot_id"))
PID_NAMESPACE = _pid_namespace()


def process_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid``, or None when there is no such process."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    try:
        fields = raw[raw.rindex(")") + 2:].split()
        return fields[0], fields[19]
    except (ValueError, IndexError):
        return None


def process_gone(pid: int) -> bool:
    """True only when no process ``pid`` exists in this PID namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def make_owner(token: str | None = None, *, host: str | None = None) -> str:
    """An owner id for this process (one per run; the threads of a run share it)."""
    pid = os.getpid()
    stat = process_stat(pid)
    start = stat[1] if stat else "0"
    return _SEP.join((_clean(host) if host else HOST, BOOT, PID_NAMESPACE, str(pid), start,
                      _clean(token or os.urandom(4).hex())))


def owner_state(owner: str | None) -> str:
    """DEAD, ALIVE or UNKNOWN (see the module docstring)."""
    parts = (owner or "").split(_SEP)
    if len(parts) != 6:
        return UNKNOWN
    host, boot, namespace, pid_text, start, _token = parts
    if (host, boot, namespace) != (HOST, BOOT, PID_NAMESPACE) or BOOT == "0" or not pid_text.isdigit():
        return UNKNOWN
    pid = int(pid_text)
    stat = process_stat(pid)
    if stat is None:
        return DEAD if process_gone(pid) else UNKNOWN
    state, started = stat
    if start != "0" and started != start:
        return DEAD  # the pid was reused by another process
    if state in ("Z", "X"):
        return DEAD
    if state in ("T", "t"):
        return UNKNOWN  # stopped: alive, but holding its work still; its lease decides
    return ALIVE
