"""jailcell on a Ray cluster: ``RayPool`` runs programs on jails spread over the cluster's nodes, with
the local :class:`~jailcell.Pool`'s API and one Result per input, whatever happens to the workers.

    import ray
    from jailcell.integrations.ray import RayPool

    ray.init(address="auto")
    with RayPool("standard") as pool:
        results = pool.map(programs)            # input order; every program jailed on some node

Each actor of the pool holds warm jails (a local Pool) on its node and checks at start that it got
nsjail with the namespaces the policy needs; an actor that cannot build them refuses to serve, and
the RayPool raises BackendUnavailable.  Programs travel in batches (one actor call per
``batch_size`` programs: a call per program costs ~15-20% throughput under load), at most
``max_in_flight`` calls per actor.

Failure semantics (also in docs/integrations.md):

- every input gets exactly one Result;
- a program whose actor died (or went silent: no answer within its time limit plus a margin) is run
  again on another actor, at most ``max_retries`` times (default 1), then gets a ``killed`` Result
  of type ``WorkerLost`` that names the lost worker; a late answer from a replaced actor is dropped;
- so a program may run twice after a worker death: if it calls host functions with side effects,
  use ``max_retries=0``;
- the dead or silent actor is killed and replaced (its placement-group bundle is kept).

Sessions are pinned to one actor: ``RayPool.session()``.  If that actor dies or restarts, every
later call raises :class:`SessionLost`.

Offline evaluation with Ray Data: ``dataset.map_batches(RunCode, fn_constructor_kwargs={...},
concurrency=N, batch_size=8)`` turns a ``code`` column into Result columns.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import time
import uuid
from typing import Any, Iterable, Iterator

from .._errors import BackendUnavailable, InputError, JailError, MissingExtra, SandboxClosed, UsageError
from .._policy import Policy
from .._result import Result

__all__ = ["RayPool", "RaySession", "RunCode", "SessionLost"]

DEADLINE_MARGIN_S = 15.0   # on top of a batch's time limits, before a silent actor is given up
START_TIMEOUT_S = 300.0    # an actor's jails must be warm within this


class SessionLost(JailError):
    """The actor that held a session died or restarted: the session's state is gone."""


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MissingExtra("jailcell.integrations.ray", "ray", exc.name) from None
    return ray


# ------------------------------------------------------------------------------------------------
# the actor: warm jails on one node
# ------------------------------------------------------------------------------------------------

class _Worker:
    """One actor: a local Pool of warm jails and the sessions pinned to it.  Made a Ray actor class
    (``ray.remote``) at first use, so importing this module does not import Ray."""

    def __init__(self, policy: Any, jails: int, options: dict[str, Any]) -> None:
        from .._pool import Pool

        self.incarnation = uuid.uuid4().hex  # sessions of an earlier incarnation are lost
        self.pool = Pool(jails, policy, **options)
        self.sessions: dict[str, Any] = {}
        from .._sandbox import Sandbox

        iso = self.pool.run("pass").isolation  # what the policy's own jails got
        # The probe itself runs under a policy that allows it to look (the user's may block os).
        with Sandbox(Policy(name="ray-probe"), backend=options.get("backend")) as sandbox:
            probe = sandbox.run("import os\nprint(os.readlink('/proc/self/ns/pid'), "
                                "os.readlink('/proc/self/ns/mnt'), os.path.exists('/etc/passwd'))")
        namespaces = set(iso.get("namespaces") or [])
        need = {"pid", "mount"} | (set() if Policy.load(policy).network else {"net"})
        pid_ns, mnt_ns, sees_host = (probe.stdout.split() + ["?", "?", "?"])[:3]
        import os

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
        import os

        return {"incarnation": self.incarnation, "node": self.node(), "pid": os.getpid()}

    def run_batch(self, items: list[tuple[int, str, float | None]]) -> list[tuple[int, Result]]:
        """Run a batch in parallel on this actor's jails; (index, Result) per item."""
        futures = [(index, self.pool._executor.submit(self.pool.run, code, timeout=timeout))
                   for index, code, timeout in items]
        out = []
        for index, future in futures:
            try:
                out.append((index, future.result()))
            except (InputError, ValueError, TypeError) as exc:  # the program itself was refused
                out.append((index, Result("error", error={"type": "InputError", "message": str(exc),
                                                          "traceback": ""})))
        return out

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


# ------------------------------------------------------------------------------------------------
# the driver side
# ------------------------------------------------------------------------------------------------

class _Slot:
    """One actor of the pool (replaced in place when it dies) and the batches it has in flight."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.actor: Any = None
        self.name = ""
        # ref -> (the batch's items with their attempt counts, the batch's deadline)
        self.in_flight: dict[Any, tuple[list[tuple[int, str, float | None, int]], float]] = {}


class RayPool:
    """Programs on jails spread over a Ray cluster.  ``policy`` and ``**sandbox_options`` are those of
    :class:`jailcell.Sandbox`.  Call ``ray.init(...)`` first, or pass ``address=``.  ``runtime_env`` is
    the actors' Ray runtime environment (a ``pip`` one puts their venv under Ray's temp dir: they still
    run jailed)."""

    def __init__(self, policy: Any = "standard", *, num_actors: int | None = None, max_retries: int = 1,
                 address: str | None = None, jails_per_actor: int = 1, batch_size: int = 8, max_in_flight: int = 2,
                 strategy: str = "SPREAD", runtime_env: dict[str, Any] | None = None,
                 **sandbox_options: Any) -> None:
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if strategy not in ("SPREAD", "PACK"):
            raise InputError(f"strategy must be SPREAD or PACK, got {strategy!r} (a STRICT_ group cannot be "
                             "re-created after a node is lost)")
        for name, value in (("max_retries", max_retries), ("jails_per_actor", jails_per_actor),
                            ("batch_size", batch_size), ("max_in_flight", max_in_flight)):
            if not isinstance(value, int) or value < (0 if name == "max_retries" else 1):
                raise InputError(f"{name} must be a {'non-negative' if name == 'max_retries' else 'positive'} "
                                 f"integer, got {value!r}")
        if not ray.is_initialized():
            if address is None:
                raise UsageError("RayPool needs a Ray cluster: call ray.init(...) first, or pass address=")
            ray.init(address=address)
        self._ray = ray
        self.policy = Policy.load(policy).with_overrides(**{k: v for k, v in sandbox_options.items()
                                                            if k in ("timeout", "memory")})
        self._options = {k: v for k, v in sandbox_options.items() if k not in ("timeout", "memory")}
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.num_actors = num_actors or max(1, cpus // jails_per_actor)
        self.max_retries, self.batch_size, self.max_in_flight = max_retries, batch_size, max_in_flight
        self._jails = jails_per_actor
        self._closed = False
        self._pg = placement_group([{"CPU": jails_per_actor}] * self.num_actors, strategy=strategy)
        if not self._pg.wait(START_TIMEOUT_S):
            ray.util.remove_placement_group(self._pg)
            raise JailError(f"the cluster cannot place {self.num_actors} actors of {jails_per_actor} CPU "
                            f"({cpus} CPUs in all); pass num_actors= or jails_per_actor=")
        self._actor_class = ray.remote(_Worker)
        self._actor_options = {"max_concurrency": 64, "max_restarts": 0,
                               **({"runtime_env": runtime_env} if runtime_env else {})}
        self._strategy = lambda i: PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)
        self._slots = [_Slot(i) for i in range(self.num_actors)]
        try:
            for slot in self._slots:
                self._start(slot, wait=False)
            for slot in self._slots:
                self._wait_ready(slot)
        except BaseException:
            self.close()
            raise
        self._next = itertools.count()

    # -- actors --------------------------------------------------------------------------------

    def _start(self, slot: _Slot, wait: bool = True) -> None:
        slot.actor = self._actor_class.options(scheduling_strategy=self._strategy(slot.index),
                                               **self._actor_options).remote(
            self.policy, self._jails, self._options)
        slot.in_flight = {}
        slot.name = f"actor {slot.index}"
        if wait:
            self._wait_ready(slot)

    def _wait_ready(self, slot: _Slot) -> None:
        try:
            hello = self._ray.get(slot.actor.hello.remote(), timeout=START_TIMEOUT_S)
        except self._ray.exceptions.RayActorError as exc:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, BackendUnavailable):
                cause = getattr(cause, "cause", None) if isinstance(getattr(cause, "cause", None), BaseException) \
                    else None
            if cause is not None:
                raise BackendUnavailable(str(cause)) from None
            said = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise BackendUnavailable(f"a Ray worker could not start its jails: {said}") from None
        slot.name = f"actor {slot.index} on node {hello['node']}"

    def _replace(self, slot: _Slot) -> None:
        try:
            self._ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        self._start(slot, wait=False)

    # -- running -------------------------------------------------------------------------------

    def run(self, code: str, *, timeout: float | None = None) -> Result:
        return next(self.imap([code], timeout=timeout))

    def map(self, codes: Iterable[str], *, timeout: float | None = None) -> list[Result]:
        """Every program's Result, in input order."""
        return list(self.imap(codes, timeout=timeout))

    def imap(self, codes: Iterable[str], *, timeout: float | None = None) -> Iterator[Result]:
        """Results in input order, as they become available in that order."""
        done: dict[int, Result] = {}
        expected = 0
        for index, result in self._results(codes, timeout):
            done[index] = result
            while expected in done:
                yield done.pop(expected)
                expected += 1

    def imap_unordered(self, codes: Iterable[str], *, timeout: float | None = None) -> Iterator[Result]:
        """Results as they finish (each still exactly once)."""
        for _index, result in self._results(codes, timeout):
            yield result

    async def amap(self, codes: Iterable[str], *, timeout: float | None = None) -> list[Result]:
        """``map`` as a coroutine (the dispatch runs in a worker thread)."""
        return await asyncio.to_thread(self.map, codes, timeout=timeout)

    def _deadline(self, items: list[Any], timeout: float | None) -> float:
        wall = timeout if timeout is not None else self.policy.limits.wall_s
        rounds = math.ceil(len(items) / self._jails)
        return time.monotonic() + rounds * (wall + 1.0) + DEADLINE_MARGIN_S

    def _results(self, codes: Iterable[str], timeout: float | None) -> Iterator[tuple[int, Result]]:
        if self._closed:
            raise SandboxClosed("this RayPool is closed")
        ray = self._ray
        source = enumerate(codes)
        pending: collections.deque[tuple[int, str, float | None, int]] = collections.deque()  # + attempts
        exhausted = False
        owner: dict[Any, _Slot] = {}
        outstanding = 0

        def refill() -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < self.batch_size * self.num_actors * self.max_in_flight:
                try:
                    index, code = next(source)
                except StopIteration:
                    exhausted = True
                    return
                pending.append((index, code, timeout, 0))

        def lost(slot: _Slot, why: str) -> Iterator[tuple[int, Result]]:
            """The slot's actor is gone: its programs go again (or get their WorkerLost Result)."""
            nonlocal outstanding
            for ref, (items, _deadline) in slot.in_flight.items():
                owner.pop(ref, None)
                outstanding -= len(items)
                for index, code, t, attempts in items:
                    if attempts < self.max_retries:
                        pending.appendleft((index, code, t, attempts + 1))
                    else:
                        yield index, Result("killed", error={
                            "type": "WorkerLost",
                            "message": f"the Ray worker running it ({slot.name}) {why}; it was tried "
                                       f"{attempts + 1} time(s) (max_retries={self.max_retries})",
                            "traceback": ""})
            self._replace(slot)

        refill()
        while pending or outstanding:
            for slot in self._slots:  # dispatch: batches to actors with room
                while pending and len(slot.in_flight) < self.max_in_flight:
                    batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                    ref = slot.actor.run_batch.remote([(i, c, t) for i, c, t, _a in batch])
                    slot.in_flight[ref] = (batch, self._deadline(batch, timeout))
                    owner[ref] = slot
                    outstanding += len(batch)
                refill()
            refs = list(owner)
            if not refs:
                continue
            now = time.monotonic()
            wait_s = max(0.05, min(deadline for s in self._slots for _b, deadline in s.in_flight.values()) - now)
            ready, _ = ray.wait(refs, num_returns=1, timeout=min(wait_s, 1.0))
            for ref in ready:
                if ref not in owner:
                    continue  # a late answer of a replaced actor: dropped
                slot = owner.pop(ref)
                items, _deadline = slot.in_flight.pop(ref)
                try:
                    answers = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.ActorUnavailableError) as exc:
                    slot.in_flight[ref] = (items, _deadline)
                    owner[ref] = slot
                    yield from lost(slot, f"died ({type(exc).__name__})")
                    continue
                outstanding -= len(items)
                yield from answers
            now = time.monotonic()
            for slot in self._slots:  # a silent actor (its node's raylet died): given up at its deadline
                if any(deadline < now for _b, deadline in slot.in_flight.values()):
                    yield from lost(slot, "stopped answering")

    # -- sessions ------------------------------------------------------------------------------

    def session(self, *, idle_timeout: float | None = None) -> RaySession:
        """A stateful session pinned to one actor (round robin)."""
        if self._closed:
            raise SandboxClosed("this RayPool is closed")
        slot = self._slots[next(self._next) % len(self._slots)]
        ray = self._ray
        try:
            hello = ray.get(slot.actor.hello.remote())
            sid = ray.get(slot.actor.session_new.remote(idle_timeout))
        except ray.exceptions.RayActorError:
            self._replace(slot)
            raise JailError("the Ray worker chosen for the session died; try again") from None
        return RaySession(ray, slot.actor, hello["incarnation"], sid, slot.name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        for slot in getattr(self, "_slots", []):
            if slot.actor is None:
                continue
            try:
                ray.get(slot.actor.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead actor has nothing left to close
                pass
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        ray.util.remove_placement_group(self._pg)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RaySession:
    """A Session on one actor of a RayPool: ``run``, ``upload``, ``download``, ``fork``,
    ``interrupt``, ``close``, as :class:`jailcell.Session`.  Raises SessionLost once the actor is gone."""

    def __init__(self, ray: Any, actor: Any, incarnation: str, sid: str, where: str) -> None:
        self._ray, self._actor, self._incarnation, self._sid, self.where = ray, actor, incarnation, sid, where
        self._closed = False

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise SandboxClosed("this session is closed")
        ray = self._ray
        try:
            return ray.get(self._actor.session_call.remote(self._incarnation, self._sid, method, *args, **kwargs))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.WorkerCrashedError) as exc:
            raise SessionLost(f"the Ray worker holding this session ({self.where}) is gone "
                              f"({type(exc).__name__}); its state is lost: start a new session") from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
            if isinstance(cause, SessionLost):
                raise SessionLost(str(cause)) from None
            if isinstance(cause, (InputError, JailError, SandboxClosed)):
                raise type(cause)(str(cause)) from None
            raise

    def run(self, code: str, *, timeout: float | None = None) -> Result:
        result: Result = self._call("run", code, timeout=timeout)
        return result

    def upload(self, name: str, data: bytes | str) -> None:
        self._call("upload", name, data)

    def download(self, name: str) -> bytes:
        data: bytes = self._call("download", name)
        return data

    def fork(self) -> RaySession:
        return RaySession(self._ray, self._actor, self._incarnation, self._call("fork"), self.where)

    def interrupt(self) -> None:
        """Stop the run in progress (from another thread): its cell is killed, the state kept."""
        self._call("interrupt")

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._call("close")
        except (SessionLost, JailError):
            pass
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# Ray Data
# ------------------------------------------------------------------------------------------------

class RunCode:
    """A callable class for ``Dataset.map_batches``: runs the ``column`` of code of each batch in this
    actor's warm jails and adds Result columns (``status``, ``stdout``, ``stderr``, ``result``,
    ``error_type``, ``error_message``, ``duration_s``).

        ds.map_batches(RunCode, fn_constructor_kwargs={"policy": "minimal"}, concurrency=2, batch_size=8)
    """

    def __init__(self, policy: Any = "standard", column: str = "code", jails: int = 1, **sandbox_options: Any) -> None:
        from .._pool import Pool

        self.column = column
        self.pool = Pool(jails, policy, **sandbox_options)
        if self.pool.run("pass").isolation.get("backend") != "nsjail":
            raise BackendUnavailable("a Ray Data worker could not run programs jailed; run `jailcell check` there")

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        codes = [str(c) for c in batch[self.column]]
        results = self.pool.map(codes)
        out = dict(batch)
        out["status"] = [r.status for r in results]
        out["stdout"] = [r.stdout for r in results]
        out["stderr"] = [r.stderr for r in results]
        out["result"] = [r.result or "" for r in results]
        out["error_type"] = [(r.error or {}).get("type", "") for r in results]
        out["error_message"] = [(r.error or {}).get("message", "") for r in results]
        out["duration_s"] = [r.duration_s for r in results]
        return out
