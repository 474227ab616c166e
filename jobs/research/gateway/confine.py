"""Least privilege for the gateway process: no key in reach, and Landlock on the file system.

:func:`refuse_if_key_visible` stops the gateway when the pseudonymisation key
could be read from its environment (:mod:`jobs.privacy.keys` sources).

:func:`confine` restricts the calling process with Landlock (Linux ≥ 5.13)
through raw syscalls: read-only on the Python installation, system libraries,
``/etc``, ``/proc``, ``/sys``, ``/dev``, the code (``jobs/``), the config folder, the
lake's ``projects/`` and ``gold/`` and the token store
(of ``/proc``, only the process's own entry and machine figures); read-write on the
audit table folder and a private temp folder; nothing else. Silver, bronze,
ops and key files then cannot be opened even through an unknown SQL escape.
Landlock restricts the calling thread and the threads and processes it starts
later, so it must run in the main thread before any other thread exists
(:func:`confine` checks ``/proc/self/task``).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.privacy.keys import ENV_KEY, ENV_KEY_FILE

ENV_AIRFLOW_KEY_CONN = "AIRFLOW_CONN_AFFLUENT_PSEUDONYM_KEY"
KEY_VARIABLES = (ENV_KEY, ENV_KEY_FILE, ENV_AIRFLOW_KEY_CONN)

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # x86_64 and aarch64 alike
_PR_SET_NO_NEW_PRIVS = 38
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_REMOVE_DIR, _REMOVE_FILE, _MAKE_CHAR, _MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
_MAKE_REG, _MAKE_SOCK, _MAKE_FIFO, _MAKE_BLOCK, _MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_ABI_V1 = (1 << 13) - 1
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
READ_ONLY = _EXECUTE | _READ_FILE | _READ_DIR


class KeyVisibleError(RuntimeError):
    """The gateway can see the pseudonymisation key; it refuses to start."""


class ConfinementUnavailable(RuntimeError):
    """Landlock cannot be applied here; the gateway refuses to start without ``--unconfined``."""


def refuse_if_key_visible(environ: dict[str, str] | None = None) -> None:
    """Raise :class:`KeyVisibleError` if a key source of :mod:`jobs.privacy.keys` is set in ``environ``."""
    env = os.environ if environ is None else environ
    visible = [name for name in KEY_VARIABLES if env.get(name)]
    if visible:
        raise KeyVisibleError(
            f"The gateway must not see the pseudonymisation key, but {', '.join(visible)} is set. Start it in an "
            "environment without the key (the key belongs to the pipeline only): unset "
            f"{', '.join(visible)} and run `affluent gateway` again.")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    abi = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(abi), 0)


def _handled(abi: int) -> int:
    rights = _ABI_V1
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    if abi >= 5:
        rights |= _IOCTL_DEV
    return rights


@dataclass(frozen=True)
class Confinement:
    """What the confined process may read, and where it may write."""

    read_only: tuple[Path, ...]
    read_write: tuple[Path, ...]


def python_paths() -> list[Path]:
    """The interpreter, its standard library and the installed packages (not the working tree)."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent.parent}
    for entry in sys.path:
        if entry and Path(entry).is_dir() and ("site-packages" in entry or entry.startswith(sys.base_prefix)):
            paths.add(Path(entry))
    return sorted(p for p in paths if p.exists())


def system_paths() -> list[Path]:
    """System libraries and devices, and of ``/proc`` only this process and the machine's figures.

    Not the whole of ``/proc``: ``/proc/<pid>/environ`` of a pipeline process
    running as the same user would hold the key.
    """
    proc = [f"/proc/{os.getpid()}", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/loadavg",
            "/proc/sys/kernel", "/proc/sys/vm"]
    return [Path(p) for p in ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", *proc, "/sys", "/dev")
            if Path(p).exists()]


def confine(rules: Confinement) -> int:
    """Apply Landlock to this process; return the ABI used. Raises :class:`ConfinementUnavailable`."""
    abi = landlock_abi()
    if abi < 1:
        raise ConfinementUnavailable("Landlock is not available on this kernel (Linux >= 5.13 with "
                                     "landlock in the LSM list)")
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise ConfinementUnavailable(f"{threads} threads are running; confinement must happen before any "
                                     "thread starts (import pyarrow/deltalake only after it)")
    handled = _handled(abi)
    libc = _libc()
    attr = _RulesetAttr(handled_access_fs=handled)
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        raise ConfinementUnavailable(f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}")
    try:
        for paths, rights in ((rules.read_only, READ_ONLY), (rules.read_write, handled)):
            for path in paths:
                _add_rule(libc, ruleset, Path(path), rights & handled)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise ConfinementUnavailable(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
        if libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise ConfinementUnavailable(f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)
    return abi


def _add_rule(libc, ruleset: int, path: Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # nothing there to allow
    try:
        if not path.is_dir():
            rights &= _FILE_RIGHTS
        attr = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        if libc.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(attr),
                        ctypes.c_uint32(0)) != 0:
            raise ConfinementUnavailable(f"landlock_add_rule on {path} failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
