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
import contextlib
import itertools
import math
import os
import shutil
import time
from typing import Any, Iterable, Iterator

from .._async import CANCEL_WAIT_S, call_cancellable
from .._errors import BackendUnavailable, InputError, JailError, MissingExtra, SandboxClosed, UsageError
from .._policy import Policy
from .._result import Result
from ._ray_worker import SessionLost, _Worker

__all__ = ["RayPool", "RaySession", "RunCode", "SessionLost"]

DEADLINE_MARGIN_S = 15.0   # on top of a batch's time limits, before a silent actor is given up
START_TIMEOUT_S = 300.0    # an actor's jails must be warm within this


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MissingExtra("jailcell.integrations.ray", "ray", exc.name) from None
    return ray


NODE_STORE_BYTES = 80 * 1024 * 1024  # a local node's object store: small (Results are small)


@contextlib.contextmanager
def _local_cluster(system_config: dict[str, Any] | None = None) -> Iterator[Any]:
    """A Ray cluster on this machine, connected (``ray.init``), of one 1-CPU node (``add_node`` for
    more), for the tests and ``jailcell bench --only ray``.  On the way out it stops only its own
    processes (``Cluster.shutdown``, never ``ray stop``, which ends every Ray process on the machine
    by name) and removes the session dir it made under Ray's temp dir (and that dir, if it made it)."""
    ray = _ray()
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"  # a leftover ~/.ray/auth_token must not switch token auth on
    head = {"num_cpus": 1, "include_dashboard": False, "object_store_memory": NODE_STORE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args={**head, "_system_config": system_config or {}})
    assert cluster.head_node is not None
    session = cluster.head_node.get_session_dir_path()  # <Ray's temp dir, /tmp/ray>/session_...
    try:
        ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(session, ignore_errors=True)
        root = os.path.dirname(session)  # Ray's temp dir goes too if nothing but this cluster's traces is left
        if set(os.listdir(root)) <= {"session_latest", "ray_current_cluster"}:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# the driver side
# ------------------------------------------------------------------------------------------------

class _Slot:
    """One actor of the pool (replaced in place when it dies) and the batches it has in flight."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.actor: Any = None
        self.hello: Any = None   # the actor's first answer: it has started its jails
        self.ready = False
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
        slot.hello, slot.ready = slot.actor.hello.remote(), False
        slot.in_flight = {}
        slot.name = f"actor {slot.index}"
        if wait:
            self._wait_ready(slot)

    def _wait_ready(self, slot: _Slot) -> None:
        try:
            hello = self._ray.get(slot.hello, timeout=START_TIMEOUT_S)
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
        slot.ready = True

    def _is_ready(self, slot: _Slot) -> bool:
        """Whether a (replacement) actor has started its jails; one that died starting is replaced.
        Batches go only to ready actors: a replacement whose bundle waits for a lost node to be
        re-placed would otherwise hold them until their deadline."""
        if slot.ready:
            return True
        done, _ = self._ray.wait([slot.hello], timeout=0)
        if not done:
            return False
        try:
            self._wait_ready(slot)
        except BackendUnavailable:
            self._replace(slot)
            return False
        return True

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
        """``map`` as a coroutine.  Cancelling it stops the programs running on the actors and starts
        no more; it raises CancelledError once the actors are free."""
        return list(await call_cancellable(self._ordered, codes, timeout))

    def _ordered(self, codes: Iterable[str], timeout: float | None, cancel: Any = None) -> list[Result]:
        done = dict(self._results(codes, timeout, cancel))
        return [done[i] for i in sorted(done)]

    def _deadline(self, items: list[Any], timeout: float | None) -> float:
        wall = timeout if timeout is not None else self.policy.limits.wall_s
        rounds = math.ceil(len(items) / self._jails)
        return time.monotonic() + rounds * (wall + 1.0) + DEADLINE_MARGIN_S

    def _results(self, codes: Iterable[str], timeout: float | None,
                 cancel: Any = None) -> Iterator[tuple[int, Result]]:
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
            for other in self._slots:  # the dead worker's cgroup dirs, on a machine a live actor shares
                if other is not slot and other.ready:
                    other.actor.sweep.remote()

        refill()
        stalled_since = time.monotonic()
        while pending or outstanding:
            if cancel is not None and cancel.cancelled:  # a cancelled amap: stop the actors' runs, then go
                busy = [slot for slot in self._slots if slot.in_flight]
                for slot in busy:
                    slot.actor.stop.remote()
                ray.wait(list(owner), num_returns=len(owner), timeout=CANCEL_WAIT_S)
                return
            for slot in self._slots:  # dispatch: batches to ready actors with room
                while pending and len(slot.in_flight) < self.max_in_flight and self._is_ready(slot):
                    batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                    ref = slot.actor.run_batch.remote([(i, c, t) for i, c, t, _a in batch])
                    slot.in_flight[ref] = (batch, self._deadline(batch, timeout))
                    owner[ref] = slot
                    outstanding += len(batch)
                refill()
            refs = list(owner)
            if not refs:  # no actor is ready (they are being replaced): wait, within bounds
                if time.monotonic() - stalled_since > START_TIMEOUT_S:
                    while pending:
                        index, _code, _t, _attempts = pending.popleft()
                        yield index, Result("killed", error={
                            "type": "WorkerLost", "traceback": "",
                            "message": f"no Ray worker of this pool could start for {START_TIMEOUT_S:g} s"})
                time.sleep(0.05)
                continue
            stalled_since = time.monotonic()
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

    @property
    def isolation(self) -> dict[str, Any]:
        """As a Sandbox's, plus where: every actor checked at start that it runs programs jailed."""
        return {"backend": "nsjail", "cluster": "ray", "actors": [slot.name for slot in self._slots],
                "policy": self.policy.name}

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


# ------------------------------------------------------------------------------------------------
# for the gateway (`jailcell serve --ray ADDRESS`): its containers are sessions on the cluster
# ------------------------------------------------------------------------------------------------

class AsyncRaySession:
    """A RaySession for asyncio code: cancelling ``run`` interrupts it on its actor (the session keeps
    the state from before that run)."""

    def __init__(self, session: RaySession) -> None:
        self._sync = session

    @property
    def closed(self) -> bool:
        return self._sync.closed

    async def run(self, code: str, *, timeout: float | None = None) -> Result:
        future = asyncio.ensure_future(asyncio.to_thread(self._sync.run, code, timeout=timeout))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.to_thread(self._sync.interrupt)
            await asyncio.wait([future])
            raise

    async def download(self, name: str) -> bytes:
        return await asyncio.to_thread(self._sync.download, name)

    async def close(self) -> None:
        await asyncio.to_thread(self._sync.close)


class AsyncRayPool:
    """What the gateway needs of a sandbox, from a RayPool: sessions on the cluster."""

    def __init__(self, pool: RayPool) -> None:
        self._sync = pool

    @property
    def policy(self) -> Policy:
        return self._sync.policy

    @property
    def isolation(self) -> dict[str, Any]:
        return self._sync.isolation

    async def session(self, *, idle_timeout: float | None = None) -> AsyncRaySession:
        return AsyncRaySession(await asyncio.to_thread(self._sync.session, idle_timeout=idle_timeout))

