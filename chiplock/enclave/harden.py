"""Harden the executor process after it has loaded its secure part.

:func:`harden` applies, in this order (each step is irreversible for an unprivileged process):

1. optionally drop to another user (``setgroups([])``, ``setresgid``, ``setresuid``);
2. ``prctl(PR_SET_DUMPABLE, 0)``: processes of the same user can no longer ``ptrace`` it, open
   ``/proc/PID/mem``/``environ``/``fd``, or read its memory with ``process_vm_readv``; the kernel writes no core
   dump of it;
3. ``RLIMIT_CORE`` 0 (soft and hard): no core file even if something made it dumpable again;
4. ``prctl(PR_SET_NO_NEW_PRIVS, 1)``: it can never gain privileges (and may install a seccomp filter unprivileged);
5. ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)``, best effort: touched pages stay out of swap. Skipped
   (and reported) under a finite ``RLIMIT_MEMLOCK`` without privilege, where it would make later allocations fail;
6. a seccomp filter (libseccomp through ``pyseccomp``): an allowlist of what a forward pass and the channel need
   (measured with ``strace -f``); everything else fails with ``EPERM`` — ``open``/``openat``, ``execve``,
   ``socket``/``connect``, ``ptrace``, ``process_vm_*``, ``fork`` (``clone`` is allowed only for threads),
   ``setuid``, ``prctl`` other than reading flags, ``kill`` of other processes.

What it does not stop: root (``CAP_SYS_PTRACE``), the kernel, a debugger attached before hardening, cold boot.

Example:
    >>> harden()                                   # doctest: +SKIP
    {'dumpable': 0, 'no_new_privs': 1, 'seccomp': 2, 'core_limit': [0, 0], 'mlockall': True, ...}
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
from typing import Any

from chiplock.errors import EnclaveError

__all__ = ["ALLOWED_SYSCALLS", "harden", "seccomp_available", "status"]

_PR_GET_DUMPABLE, _PR_SET_DUMPABLE = 3, 4
_PR_SET_NAME, _PR_GET_NAME = 15, 16
_PR_GET_SECCOMP = 21
_PR_SET_NO_NEW_PRIVS, _PR_GET_NO_NEW_PRIVS = 38, 39
_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4
_CLONE_THREAD = 0x00010000
_AT_EMPTY_PATH = 0x1000
_FIONBIO, _FIONREAD, _TCGETS = 0x5421, 0x541B, 0x5401
_F_GETFD, _F_GETFL, _F_SETFL = 1, 3, 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int

#: Allowed with any arguments: memory, futexes, threads' housekeeping, time, and I/O on fds already open.
ALLOWED_SYSCALLS = (
    "read", "readv", "write", "writev", "recvfrom", "recvmsg", "sendto", "sendmsg", "shutdown", "close",
    "getsockname", "getpeername", "getsockopt",
    "select", "pselect6", "poll", "ppoll", "epoll_wait", "epoll_pwait",
    "futex", "futex_waitv", "set_robust_list", "get_robust_list", "rseq", "membarrier",
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mlock", "munlock",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    "exit", "exit_group", "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid",
    "clock_gettime", "clock_getres", "gettimeofday", "nanosleep", "clock_nanosleep", "sched_yield",
    "sched_getaffinity", "getrandom", "fstat", "lseek", "getcwd", "uname", "sysinfo",
)

_state: dict[str, Any] = {"mlockall": None, "seccomp_filter": False, "user": None}


def _prctl(option: int, arg: int = 0) -> int:
    return _libc.prctl(option, arg, 0, 0, 0)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise EnclaveError(f"cannot {what} ({os.strerror(err)}); run the executor on Linux >= 3.5 or pass "
                           "--no-harden knowing that the secure part is then unprotected")


def seccomp_available() -> bool:
    """Whether the seccomp filter can be installed here (``pyseccomp`` and ``libseccomp`` present)."""
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def _drop_user(user: str | int) -> None:
    import pwd

    try:
        pw = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        raise EnclaveError(f"no such user {user!r}; create it or pass an existing --user") from None
    try:
        os.setgroups([])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    except PermissionError:
        raise EnclaveError(f"cannot drop to user {pw.pw_name!r}: only root can; start the executor as root "
                           "or leave out --user") from None
    if os.getresuid() != (pw.pw_uid,) * 3 or os.getresgid() != (pw.pw_gid,) * 3:
        raise EnclaveError(f"dropping to user {pw.pw_name!r} did not take effect; do not run the executor")
    _state["user"] = pw.pw_name


def _mlockall() -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and os.geteuid() != 0:
        return False
    return _libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) == 0


def _install_seccomp(extra: tuple[str, ...] = ()) -> None:
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError, OSError):
        raise EnclaveError("cannot install the seccomp filter: pyseccomp or libseccomp is missing; "
                           "`pip install chiplock[enclave]` and install libseccomp2, or pass --no-seccomp") from None
    f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    # Every thread, not only the caller: torch's worker threads exist already (warm-up) and run secure code.
    f.set_attr(sc.Attr.CTL_TSYNC, 1)
    for name in (*ALLOWED_SYSCALLS, *extra):
        try:
            f.add_rule(sc.ALLOW, name)
        except (OSError, ValueError, RuntimeError):
            pass  # A syscall this architecture does not have.
    me = os.getpid()
    # Threads only: a fork could carry the weights into a process that is not hardened the same way.
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
    # clone3's flags sit behind a pointer seccomp cannot read; ENOSYS makes glibc fall back to clone.
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for opt in (_PR_GET_DUMPABLE, _PR_GET_SECCOMP, _PR_GET_NO_NEW_PRIVS, _PR_SET_NAME, _PR_GET_NAME):
        f.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, opt))
    # fstat on an fd already open (glibc's fstat is newfstatat(fd, "", .., AT_EMPTY_PATH)), never a path.
    for name in ("newfstatat", "statx"):
        try:
            f.add_rule(sc.ALLOW, name, sc.Arg(2 if name == "statx" else 3, sc.MASKED_EQ, _AT_EMPTY_PATH,
                                              _AT_EMPTY_PATH))
        except (OSError, ValueError, RuntimeError):
            pass
    for req in (_FIONBIO, _FIONREAD, _TCGETS):
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, req))
    for cmd in (_F_GETFD, _F_GETFL, _F_SETFL):
        f.add_rule(sc.ALLOW, "fcntl", sc.Arg(1, sc.EQ, cmd))
    # Signals to itself only (abort, a thread's raise).
    f.add_rule(sc.ALLOW, "tgkill", sc.Arg(0, sc.EQ, me))
    # Reading a resource limit (prlimit64 with no new limit), never setting one.
    f.add_rule(sc.ALLOW, "prlimit64", sc.Arg(0, sc.EQ, 0), sc.Arg(2, sc.EQ, 0))
    try:
        f.load()
    except OSError as e:
        raise EnclaveError(f"the kernel refused the seccomp filter ({e}); pass --no-seccomp knowing that the "
                           "executor can then open files and sockets") from None
    _state["seccomp_filter"] = True


def protect_early() -> None:
    """The first thing a hardening executor does, before it reads its secret or licence: non-dumpable (no
    ptrace or /proc/PID/mem for same-user processes, no core dump) from the start, and refuse to run if a tracer is
    already attached (the host that spawned it could otherwise watch the key being derived).

    Raises:
        EnclaveError: The process is being traced, or cannot be made non-dumpable.
    """
    _check(_prctl(_PR_SET_DUMPABLE, 0), "make the process non-dumpable")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as e:
        raise EnclaveError(f"cannot set RLIMIT_CORE to 0 ({e}); pass --no-harden to run unprotected") from None
    try:
        with open("/proc/self/status") as f:
            tracer = next((line.split()[1] for line in f if line.startswith("TracerPid:")), "0")
    except OSError:
        tracer = "0"
    if tracer != "0":
        raise EnclaveError(f"the executor is being traced (by pid {tracer}); refusing to derive its key")


def harden(*, user: str | int | None = None, seccomp: bool = True, mlockall: bool = True,
           extra_syscalls: tuple[str, ...] = ()) -> dict[str, Any]:
    """Harden this process (see the module docstring); call it once, after loading, before serving.

    Args:
        user: Drop to this user (name or uid) first; needs root.
        seccomp: Install the syscall allowlist (raises if it cannot be installed).
        mlockall: Try ``mlockall`` (best effort; the result is reported, never raised).
        extra_syscalls: More syscall names to allow (for a model whose forward pass needs them).

    Returns:
        :func:`status` after hardening.

    Raises:
        EnclaveError: A step that must not be skipped failed (the message says what to do).
    """
    if user is not None:
        _drop_user(user)
    _check(_prctl(_PR_SET_DUMPABLE, 0), "make the process non-dumpable")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as e:
        raise EnclaveError(f"cannot set RLIMIT_CORE to 0 ({e}); pass --no-harden to run unprotected") from None
    _check(_prctl(_PR_SET_NO_NEW_PRIVS, 1), "set no-new-privs")
    _state["mlockall"] = _mlockall() if mlockall else False
    if seccomp:
        _install_seccomp(tuple(extra_syscalls))
    return status()


def status() -> dict[str, Any]:
    """The process's hardening flags, read from the kernel where it can tell (works under the filter).

    Keys: ``dumpable`` (``PR_GET_DUMPABLE``), ``no_new_privs``, ``seccomp`` (``PR_GET_SECCOMP``: 0 off, 2 filter),
    ``core_limit`` ([soft, hard]), ``mlockall`` (None: not tried), ``user`` (dropped to), ``uid``.
    """
    return {
        "dumpable": _prctl(_PR_GET_DUMPABLE),
        "no_new_privs": _prctl(_PR_GET_NO_NEW_PRIVS),
        "seccomp": _prctl(_PR_GET_SECCOMP),
        "core_limit": list(resource.getrlimit(resource.RLIMIT_CORE)),
        "mlockall": _state["mlockall"],
        "user": _state["user"],
        "uid": os.getuid(),
    }
