"""The Ray actor behind ``RayPool``: warm jails on one node, and the sessions pinned to it.  It runs
on the cluster's nodes (``ray.remote`` is applied by the pool, so this module does not import Ray)."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from .._errors import BackendUnavailable, InputError, JailError
from .._policy import Policy
from .._result import Result

SWEEP_FOR_S = 10.0         # how long a live actor keeps removing a dead worker's cgroup dirs


class SessionLost(JailError):
    """The actor that held a session died or restarted: the session's state is gone."""


class _Worker:
    """One actor: a local Pool of warm jails and the sessions pinned to it.  Made a Ray actor class
    (``ray.remote``) at first use, so importing this module does not import Ray."""

    def __init__(self, policy: Any, jails: int, options: dict[str, Any]) -> None:
        from .._pool import Pool
        from .._sandbox import Sandbox

        self.incarnation = uuid.uuid4().hex  # sessions of an earlier incarnation are lost
        self.pool = Pool(jails, policy, **options)
        self.sessions: dict[str, Any] = {}
        self.generation = 0  # bumped by stop(): batches of an earlier generation start no more runs
        iso = self.pool.run("pass").isolation  # what the policy's own jails got
        # The probe itself runs under a policy that allows it to look (the user's may block os).
        with Sandbox(Policy(name="ray-probe"), backend=options.get("backend")) as sandbox:
            probe = sandbox.run("import os\nprint(os.readlink('/proc/self/ns/pid'), "
                                "os.readlink('/proc/self/ns/mnt'), os.path.exists('/etc/passwd'))")
        namespaces = set(iso.get("namespaces") or [])
        need = {"pid", "mount"} | (set() if Policy.load(policy).network else {"net"})
        pid_ns, mnt_ns, sees_host = (probe.stdout.split() + ["?", "?", "?"])[:3]
        own = (os.readlink("/proc/self/ns/pid"), os.readlink("/proc/self/ns/mnt"))
        if not probe.ok or iso.get("backend") != "nsjail" or not need <= namespaces or (pid_ns, mnt_ns) == own \
                or pid_ns == own[0] or mnt_ns == own[1] or sees_host != "False":
            self.shutdown()
            raise BackendUnavailable(f"a Ray worker on node {self.node()} could not run programs jailed (backend "
                                     f"{iso.get('backend')!r}, namespaces {sorted(namespaces)}, the probe said "
                                     f"{probe.status}: {probe.stdout.strip() or probe.error}); it refuses to serve. "
                                     "Run `jailcell check` on that node")

    @staticmethod
    def node() -> str:
        import ray

        return ray.get_runtime_context().get_node_id()[:12]

    def hello(self) -> dict[str, Any]:
        return {"incarnation": self.incarnation, "node": self.node(), "pid": os.getpid()}

    def sweep(self) -> None:
        """Remove the cgroup dirs of jailcell processes on this machine that are gone (a killed worker
        cannot remove its own): asked of every live actor when one dies."""
        cgroups = getattr(self.pool._all[0]._engine.backend, "cgroups", None)
        if cgroups is None or not cgroups.version:
            return
        deadline = time.monotonic() + SWEEP_FOR_S  # a dir is removable once the jail in it has ended
        while cgroups.sweep_stale() and time.monotonic() < deadline:
            time.sleep(0.2)

    def run_batch(self, items: list[tuple[int, str, float | None]]) -> list[tuple[int, Result]]:
        """Run a batch in parallel on this actor's jails; (index, Result) per item.  A ``stop()``
        while it runs kills the programs running and starts no more of it."""
        generation = self.generation

        def one(code: str, timeout: float | None) -> Result:
            if self.generation != generation:
                return Result("killed", error={"type": "Cancelled", "message": "the map was cancelled",
                                               "traceback": ""})
            return self.pool.run(code, timeout=timeout)

        futures = [(index, self.pool._executor.submit(one, code, timeout)) for index, code, timeout in items]
        out = []
        for index, future in futures:
            try:
                out.append((index, future.result()))
            except (InputError, ValueError, TypeError) as exc:  # the program itself was refused
                out.append((index, Result("error", error={"type": "InputError", "message": str(exc),
                                                          "traceback": ""})))
        return out

    def stop(self) -> None:
        """Cancel the batches in progress (a cancelled ``amap``): interrupt every run, start no more."""
        self.generation += 1
        for sandbox in self.pool._all:
            sandbox.interrupt()

    # -- sessions ------------------------------------------------------------------------------

    def _session(self, incarnation: str, sid: str) -> Any:
        if incarnation != self.incarnation or sid not in self.sessions:
            raise SessionLost("the Ray worker holding this session restarted; its state is gone")
        return self.sessions[sid]

    def session_new(self, idle_timeout: float | None) -> str:
        sid = uuid.uuid4().hex
        self.sessions[sid] = self.pool._all[0].session(idle_timeout=idle_timeout)
        return sid

    def session_call(self, incarnation: str, sid: str, method: str, *args: Any, **kwargs: Any) -> Any:
        session = self._session(incarnation, sid)
        if method == "fork":
            child = uuid.uuid4().hex
            self.sessions[child] = session.fork()
            return child
        if method == "close":
            self.sessions.pop(sid, None)
        return getattr(session, method)(*args, **kwargs)

    def shutdown(self) -> None:
        """Close every jail and wait until they are gone (Ray may end this process right after)."""
        from .._host._teardown import teardown

        for session in list(self.sessions.values()):
            session.close()
        self.pool.close()
        teardown.join()
