"""``isolation="sandbox"``: the sandbox process shuts itself in before the function's code is loaded.

What :func:`enter` does, in this order (the order is what makes it hold, see the kernel's rules in
``user_namespaces(7)``):

1. New mount and IPC namespaces (and a network namespace with only its own loopback when ``network=False``). Run as
   root, the engine does this in the host's user namespace; run as another user, the process first creates a user
   namespace mapping one inside uid to its own, which lets it do the same. And a PID namespace of its own, in which
   the sandbox is pid 1: a root zygote forks a sandboxed child straight into a new one (:func:`fork_in_pid_namespace`,
   no cost beyond the fork); otherwise (a spawned sandbox, an unprivileged host) the process makes one here and
   forks once into it, and the parent stays outside only to wait for it and end as it ends (:func:`_become_init`).
2. A new root, built like bubblewrap's (an allow-list: what is not bound is absent, not merely hidden): a tmpfs with
   read-only binds of ``/usr``, ``/etc`` (``/etc/shadow`` and ``/etc/gshadow`` replaced by an empty file), the
   interpreter and the folders of what the process imported, the function's own bundle, environment and model
   store; the grants (``read_paths`` read-only, ``write_paths`` writable); ``/dev`` with null, zero, random and
   urandom only; a fresh ``/proc`` of its own PID namespace (this sandbox and its children, nothing else);
   ``/sys`` read-only; a private ``/tmp`` tmpfs sized from ``memory_mb``. The engine's state
   (records, other bundles, environments) is covered by empty read-only tmpfs where it lies inside a bound folder.
   ``pivot_root`` into it, the old root left under an empty read-only tmpfs (:func:`_pivot` says why that holds):
   nothing of the host's tree is reachable any more. A spare forked for ``isolation="sandbox"`` builds the part every
   function shares (namespaces, the system's and the interpreter's folders, /dev, /proc) before its request
   (:func:`prepare_root`); the request adds its own binds, /tmp, and what follows.
3. As root: drop to a uid/gid of its own (``SANDBOX_ID_BASE + pid``: no two live sandboxes share one, so none can
   signal or trace another), then a user namespace in which that uid is ``INSIDE_ID`` (not 0).
4. Every capability dropped (bounding, ambient, effective, permitted, inheritable), ``PR_SET_NO_NEW_PRIVS``, and
   the seccomp filter (:mod:`minifaas_sandbox.seccomp`) last, since it refuses the calls made above.

Anything failing raises :class:`IsolationError`: the sandbox answers INIT with the error and never runs the function
unconfined.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterable
from typing import Any, Final

from minifaas_sandbox import lifeline

CLONE_NEWNS: Final = 0x00020000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 0x40000
MNT_DETACH: Final = 0x2
MOUNT_ATTR_RDONLY: Final = 0x1
MOUNT_ATTR_NOSUID: Final = 0x2
MOUNT_ATTR_NODEV: Final = 0x4
AT_FDCWD: Final = -100
AT_RECURSIVE: Final = 0x8000
#: mount_setattr has one number on every architecture (it is newer than the unified syscall table)
SYS_MOUNT_SETATTR: Final = 442
PR_SET_PDEATHSIG: Final = 1
PR_SET_DUMPABLE: Final = 4
PR_CAPBSET_DROP: Final = 24
PR_SET_NO_NEW_PRIVS: Final = 38
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
LINUX_CAPABILITY_VERSION_3: Final = 0x20080522
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1
#: a sandbox's host uid and gid are this plus its pid: unprivileged, unnamed, and distinct among live sandboxes
SANDBOX_ID_BASE: Final = 1 << 28
#: what the function sees as its uid and gid
INSIDE_ID: Final = 1000
#: the private /tmp of a function deployed without a memory limit
DEFAULT_TMP_MB: Final = 64
#: the read-only tmpfs that stand in for hidden folders and make up the new root hold next to nothing
SMALL_TMPFS: Final = "size=1m,nr_inodes=4096,mode=0755"
SHM_TMPFS: Final = "size=16m,mode=1777"
#: what every sandbox sees of the host, read-only
SYSTEM_PATHS: Final = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/sys")
#: private to each sandbox
PRIVATE_PATHS: Final = ("/tmp", "/dev", "/proc")
#: replaced by an empty file in the sandbox's /etc
HIDDEN_FILES: Final = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-")
DEVICES: Final = ("null", "zero", "random", "urandom")
DEV_LINKS: Final = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
#: where the host's root lies in a sandbox's, under an empty read-only tmpfs (see :func:`_pivot`)
HOST_ROOT: Final = "/.host"
#: where the new root may be assembled (in the sandbox's own mount namespace: the host's folder is not touched):
#: the first of these that holds nothing to bind, since the stage covers what is under it
STAGES: Final = ("/mnt", "/media", "/srv", "/boot", "/tmp", "/var/tmp")


class IsolationError(OSError):
    """The sandbox could not be set up; the function must not run."""


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    libc.unshare.argtypes = (ctypes.c_int,)
    libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise IsolationError(err, f"sandbox set-up failed: {what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc().mount(
        src.encode() if src else None,
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    _check(rc, f"mount {src or fstype} on {target}")


def _setattr(target: str, attrs: int, *, recursive: bool) -> None:
    attr = _MountAttr(attrs, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    rc = _libc().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr))
    _check(int(rc), f"mount_setattr {target}")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@functools.cache
def _base_paths() -> tuple[str, ...]:
    """What the interpreter needs to go on importing: its prefixes, sys.path, and the folders of what is imported
    (an editable install's packages are not on sys.path). A spare computes it ahead of its request."""
    found: set[str] = set()
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        found.add(os.path.abspath(prefix))
    cwd = os.getcwd()
    for entry in sys.path:
        if entry and os.path.isabs(entry) and entry != cwd and os.path.isdir(entry):
            found.add(os.path.abspath(entry))
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and os.path.isabs(path):
            found.add(os.path.dirname(os.path.abspath(path)))
    # a sandbox's own /tmp, /dev and /proc are never the host's, whatever was imported from there; but an interpreter
    # installed under the host's /tmp (a CI job's virtualenv) is bound on top of the private /tmp (_build_request)
    kept = [f for f in found if f != "/" and not any(_inside(f, p) for p in PRIVATE_PATHS if p != "/tmp")]
    kept = [f for f in kept if f != "/tmp"]
    return tuple(_outermost(kept))


def _outermost(paths: Iterable[str]) -> list[str]:
    """The paths not inside another of them."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(_inside(path, k) for k in kept):
            kept.append(path)
    return kept


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def prepare() -> None:
    """What can be done once before any request: the filter built, the interpreter's folders listed."""
    from minifaas_sandbox import seccomp

    seccomp.program()
    _base_paths()
    _last_capability()


def _base_binds() -> list[str]:
    """What every sandbox sees read-only: the system's folders and the interpreter's (outer first)."""
    ro = [p for p in SYSTEM_PATHS if os.path.lexists(p)] + list(_base_paths())
    return sorted(_outermost(ro), key=lambda p: (len(p), p))


def plan(view: dict[str, Any]) -> tuple[list[tuple[str, bool]], list[str]]:
    """A function's own binds ((path, writable), outer first: its bundle, environment, model store and grants) and
    the hidden folders of its root; the base binds (:func:`_base_binds`) come first, under them."""
    ro = _outermost(os.path.abspath(str(p)) for p in view.get("ro") or ())
    rw = [os.path.abspath(str(p)) for p in view.get("rw") or ()]
    binds = [(p, False) for p in ro] + [(p, True) for p in rw]
    binds.sort(key=lambda b: (len(b[0]), b[0]))
    hide = [os.path.abspath(str(p)) for p in view.get("hide") or ()]
    return binds, hide


#: a spare's root built ahead of its request (:func:`prepare_root`): the stage, its base binds; or the error that
#: stopped it (its request then fails, as the same steps would fail at INIT)
_prepared: tuple[str, list[str]] | IsolationError | None = None


def prepare_root() -> None:
    """In a spare forked for isolation="sandbox" as pid 1 of its own PID namespace, as root: the request's steps that
    do not depend on the function (new mount and IPC namespaces, the base of the new root: the system's folders, the
    interpreter's, /dev and /proc), ahead of the request. :func:`enter` then adds only the function's binds, /tmp,
    and the steps that shut the process in."""
    global _prepared
    if os.geteuid() != 0 or os.getpid() != 1:
        return
    try:
        base = _base_binds()
        stage = _stage(base)
        _check(_libc().unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare (mount, ipc namespaces)")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _build_base(stage, base)
    except IsolationError as exc:
        _prepared = exc
    except OSError as exc:
        _prepared = IsolationError(exc.errno or errno.EIO, f"sandbox set-up failed: {exc}")
    else:
        _prepared = (stage, base)


def _stage(binds: Iterable[str]) -> str:
    """The first of STAGES with nothing to bind under it (the stage covers it in the sandbox's mount namespace)."""
    paths = list(binds)
    stage = next((s for s in STAGES if os.path.isdir(s) and not any(_inside(p, s) for p in paths)), None)
    if stage is None:
        raise IsolationError(errno.EBUSY, f"no folder to build the sandbox's root in (tried {', '.join(STAGES)})")
    return stage


def enter(view: dict[str, Any], *, network: bool, memory_mb: int) -> None:
    """Shut this process in (see the module's docstring). Must run before any thread exists."""
    libc = _libc()
    as_root = os.geteuid() == 0
    binds, hide = plan(view)
    prepared = _prepared
    if isinstance(prepared, IsolationError):
        raise prepared
    if prepared is not None and any(_inside(p, prepared[0]) for p, _w in binds):
        # a grant under the folder the spare built its root in (it covers that folder): start over without it
        # (rare: the detach costs an RCU grace period)
        _check(libc.umount2(prepared[0].encode(), MNT_DETACH), "detach the prepared root")
        prepared = None
    for path, _writable in binds:
        if not os.path.lexists(path):
            raise IsolationError(errno.ENOENT, f"cannot grant {path}: it does not exist")
    uid, gid = os.geteuid(), os.getegid()
    if prepared is None:
        base = _base_binds()
        stage = _stage([*base, *(p for p, _w in binds)])
        flags = CLONE_NEWNS | CLONE_NEWIPC | (0 if network else CLONE_NEWNET)
        # pid 1 here: forked into a PID namespace of its own already (a root zygote's sandbox)
        own_pid_ns = os.getpid() == 1
        if not own_pid_ns:
            flags |= CLONE_NEWPID
        if not as_root:
            _check(libc.unshare(flags | CLONE_NEWUSER), "unshare (user, mount, ipc, pid namespaces)")
            _map_ids(uid, gid)
        else:
            _check(libc.unshare(flags), "unshare (mount, ipc, pid namespaces)")
        if not own_pid_ns:
            # before /proc is mounted: a proc shows the PID namespace of the process that mounts it
            _become_init()
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _build_base(stage, base)
    else:
        stage, base = prepared
        if not network:
            _check(libc.unshare(CLONE_NEWNET), "unshare (network namespace)")
    if not network:
        _loopback_up()
    # the pid the host knows (the host's /proc is still this process's /proc): no two live sandboxes share it
    host_pid = int(os.readlink("/proc/self"))
    _build_request(stage, base, binds, hide, memory_mb=memory_mb)
    _pivot(stage)
    if as_root:
        sid = SANDBOX_ID_BASE + host_pid
        os.setgroups([])
        os.setresgid(sid, sid, sid)
        os.setresuid(sid, sid, sid)
        # a change of uid makes the process undumpable, which would leave its /proc/self files root's
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        _check(libc.unshare(CLONE_NEWUSER), "unshare (user namespace)")
        _map_ids(sid, sid)
    _drop_capabilities()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    from minifaas_sandbox import seccomp

    try:
        seccomp.load()
    except OSError as exc:
        raise IsolationError(exc.errno or errno.EPERM, f"sandbox set-up failed: {exc}") from None
    os.chdir("/tmp")


def fork_in_pid_namespace() -> int:
    """``os.fork()`` with the child as pid 1 of a new PID namespace (the caller stays in its own). Needs
    CAP_SYS_ADMIN: raises OSError where the caller lacks it (the child then makes its own in :func:`enter`)."""
    libc = _libc()
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.unshare(CLONE_NEWPID) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWPID): {os.strerror(err)}")
        try:
            pid = os.fork()
        except BaseException:
            libc.setns(own, CLONE_NEWPID)
            raise
        # the caller's next child goes back to the caller's namespace (the child has left it for good)
        if pid != 0 and libc.setns(own, CLONE_NEWPID) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns back to the own PID namespace: {os.strerror(err)}")
        return pid
    finally:
        os.close(own)


def _become_init() -> None:
    """After ``unshare(CLONE_NEWPID)``: fork; the child (pid 1 of the new namespace) goes on as the sandbox. The
    parent is what the host knows (its pid, its pidfd): it closes every fd, so the channel and pipes are the child's
    alone, waits for the child and ends as it ended. The host's SIGKILL reaches both (one process group), and the
    child is killed when the parent dies (as long as its uid stays: as root, the change to the sandbox's own uid
    clears that). Both die with the host: the parent keeps the lifeline it armed, the child arms its own as its
    namespace's init (a SIGKILL through the parent's would never reach it)."""
    pid = os.fork()
    if pid == 0:
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if lifeline.armed_fd() >= 0:
            # also sees a host that died before the prctl (the parent then may have died already too)
            lifeline.arm(lifeline.armed_fd())
        return
    try:
        keep = lifeline.armed_fd()
        if keep >= 0:
            os.closerange(0, keep)
            os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        else:
            os.closerange(0, os.sysconf("SC_OPEN_MAX"))
        for ignored in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(ignored, signal.SIG_IGN)
        while True:
            try:
                _pid, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    finally:
        os._exit(1)


def reap_orphans() -> int:
    """In pid 1 of a PID namespace, which inherits every process whose parent ended: wait for the ones that have
    exited (a zombie holds a pid of the sandbox's pids cgroup until then). Returns how many."""
    n = 0
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        n += 1


def _map_ids(uid: int, gid: int) -> None:
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{INSIDE_ID} {uid} 1\n")
    _write("/proc/self/gid_map", f"{INSIDE_ID} {gid} 1\n")


def _build_base(root: str, base: list[str]) -> None:
    """The part of a sandbox's root every function shares: an empty tmpfs, the base binds read-only, the system's
    secrets replaced by empty files, /dev, /proc of the PID namespace, and the folder the host's root goes to."""
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, SMALL_TMPFS)
    for path in base:
        if not _inside(path, "/tmp"):  # under the private /tmp each request mounts: bound after it
            _bind(root, path, writable=False)
    _hide_files(root)
    _build_dev(root)
    _make_mountpoint(root + "/proc", directory=True)
    # the proc of its own PID namespace: it lists this sandbox and its children only
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
    _make_mountpoint(root + HOST_ROOT, directory=True)


def _build_request(
    root: str, base: list[str], binds: list[tuple[str, bool]], hide: list[str], *, memory_mb: int
) -> None:
    """A function's part of its root: a private /tmp, its own binds and grants, the hidden folders."""
    # the private /tmp first: a grant or a bundle under the host's /tmp is bound on top of it
    _make_mountpoint(root + "/tmp", directory=True)
    tmp_mb = memory_mb if memory_mb > 0 else DEFAULT_TMP_MB
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,mode=1777")
    # a base folder under a grant is bound again on top of it: read-only, whatever the grant is; and one under the
    # host's /tmp (the interpreter's own folders, e.g. a virtualenv there) is bound on top of the private /tmp
    again = [b for b in base if _inside(b, "/tmp") or any(_inside(b, p) and b != p for p, _w in binds)]
    # outer first, so a hidden folder covers what its bound parent shows, and a grant inside it comes after
    ops: list[tuple[str, str, bool]] = [("bind", p, w) for p, w in binds] + [("bind", b, False) for b in again]
    every = [*base, *(p for p, _w in binds)]
    ops += [("hide", h, False) for h in hide if any(_inside(h, p) and h != p for p in every)]
    ops.sort(key=lambda op: (len(op[1]), op[0] == "bind", op[1]))
    hidden_mounts: list[str] = []
    for kind, path, writable in ops:
        target = root + path
        if kind == "bind":
            _bind(root, path, writable=writable)
        elif os.path.isdir(target):
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, SMALL_TMPFS)
            hidden_mounts.append(target)
    if any(_inside(f, p) for f in HIDDEN_FILES for p, _w in [*binds, *((b, False) for b in again)]):
        _hide_files(root)
    for target in hidden_mounts:
        _setattr(target, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive=False)


def _bind(root: str, path: str, *, writable: bool) -> None:
    target = root + path
    if os.path.islink(path) and path in SYSTEM_PATHS:
        # /bin -> usr/bin on merged-/usr systems: the link, not a second copy
        with contextlib.suppress(FileExistsError):
            os.symlink(os.readlink(path), target)
        return
    _make_mountpoint(target, directory=os.path.isdir(path))
    _mount(path, target, None, MS_BIND | MS_REC)
    attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (0 if writable else MOUNT_ATTR_RDONLY)
    _setattr(target, attrs, recursive=True)


def _hide_files(root: str) -> None:
    for path in HIDDEN_FILES:
        if os.path.exists(root + path):
            _mount("/dev/null", root + path, None, MS_BIND)
            _setattr(root + path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive=False)


def _build_dev(root: str) -> None:
    dev = root + "/dev"
    _make_mountpoint(dev, directory=True)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID, SMALL_TMPFS)
    for name in DEVICES:
        _make_mountpoint(f"{dev}/{name}", directory=False)
        _mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, link in DEV_LINKS.items():
        os.symlink(link, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm")
    _mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, SHM_TMPFS)
    _setattr(dev, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, recursive=False)


def _make_mountpoint(target: str, *, directory: bool) -> None:
    if os.path.lexists(target):
        return
    if directory:
        os.makedirs(target, exist_ok=True)
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))


def _pivot(stage: str) -> None:
    """Make the staged root the root; the host's root goes under it to HOST_ROOT, covered by an empty read-only
    tmpfs. Detaching it instead (what bubblewrap and nsjail do) waits for an RCU grace period: 2-10 ms measured
    here, most of a sandbox's cold start. Covered, nothing reaches it: no path leads under the cover, unmounting
    the cover needs a capability over the mount namespace that the sandbox never has after set-up (and seccomp
    refuses umount2 and every call that opens a mount), and the process holds no fd or cwd inside it."""
    from minifaas_sandbox import seccomp

    nr = seccomp.syscall_number("pivot_root")
    os.chdir(stage)
    _check(int(_libc().syscall(nr, b".", HOST_ROOT.lstrip("/").encode())), "pivot_root")
    os.chdir("/")
    _mount("tmpfs", HOST_ROOT, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=1,mode=0")
    _setattr("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive=False)


@functools.cache
def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def _drop_capabilities() -> None:
    libc = _libc()
    for cap in range(_last_capability() + 1):
        _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} from the bounding set")
    with contextlib.suppress(OSError):
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset (drop all)")


def _loopback_up() -> None:
    # the new network namespace's loopback starts down; up, local servers inside the function work
    ifreq = struct.Struct("16sH14x")
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = ifreq.unpack(fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq.pack(b"lo", 0)))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, ifreq.pack(b"lo", flags | IFF_UP))


def probe() -> str | None:
    """Whether a sandbox can be set up here: None if so, else what is missing. Forks a child that tries."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            enter({}, network=False, memory_mb=1)
            if os.geteuid() == 0:
                raise IsolationError(errno.EPERM, "still root after set-up")
        except BaseException as exc:
            os.write(w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode(errors="replace")
    _pid, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return message or f"the probe exited with {os.waitstatus_to_exitcode(status)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["--probe"]:
        print("usage: python -m minifaas_sandbox.isolation --probe", file=sys.stderr)
        return 2
    missing = probe()
    print(missing or "ok")
    return 0 if missing is None else 1


if __name__ == "__main__":
    sys.exit(main())
