"""Cancelling async runs stops them (trio's rule): the program is killed at once or never starts, the
sandbox is free for the next run, and a session keeps the state it had before the cancelled run.
Bounds here are far apart (a 15 s program against a few seconds), not timings."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from jailcell import AsyncSandbox, AsyncSession, Pool, Sandbox, Session

from ..conftest import busiest_cpu_s

SLEEP = "import time; time.sleep(15)"


def test_cancelling_a_session_run_kills_it_and_keeps_the_state_before_it():
    async def main():
        async with AsyncSandbox("minimal") as sb:
            async with await sb.session() as s:
                await s.run("x = 1")
                t0 = time.monotonic()
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(s.run("x = 2\ny = 3\n" + SLEEP), 1)
                r = await s.run("print(x, 'y' in globals())")
                assert time.monotonic() - t0 < 6  # not the 15 s the program wanted, nor the 30 s limit
                assert r.ok and r.stdout == "1 False\n", r

    asyncio.run(main())


def test_cancelling_a_spinning_run_frees_the_sandbox_at_once():
    async def main():
        async with AsyncSandbox("minimal", warm=True) as sb:
            task = asyncio.ensure_future(sb.run("while True: pass", timeout=60))
            await asyncio.sleep(0.5)
            task.cancel()
            t0 = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - t0 < 5
            r = await sb.run("print('next')")
            assert r.ok and r.stdout == "next\n"
            assert busiest_cpu_s(sb._sync._jail.pid) < 0.2  # the spinning cell was killed

    asyncio.run(main())


def test_a_run_cancelled_while_waiting_for_its_turn_never_starts():
    started = []

    async def main():
        async with AsyncSandbox("minimal", warm=True, functions={"mark": started.append}) as sb:
            first = asyncio.ensure_future(sb.run("mark('first')\nimport time; time.sleep(1.5)"))
            await asyncio.sleep(0.3)
            second = asyncio.ensure_future(sb.run("mark('second')"))
            await asyncio.sleep(0.3)
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
            assert (await first).ok
            assert (await sb.run("print(1)")).stdout == "1\n"

    asyncio.run(main())
    assert started == ["first"]


def test_sandbox_interrupt_stops_the_run_in_progress():
    with Sandbox("minimal", warm=True) as sb:
        threading.Timer(0.5, sb.interrupt).start()
        t0 = time.monotonic()
        r = sb.run("while True: pass", timeout=30)
        assert time.monotonic() - t0 < 5
        assert r.status == "killed" and r.error["type"] == "Interrupted", r
        assert sb.run("print(2)").stdout == "2\n"  # the interrupt was for that run only
        sb.interrupt()  # none in progress: nothing happens, and the next run is not hit
        assert sb.run("print(3)").stdout == "3\n"


def test_cancelling_pool_amap_stops_running_programs_and_starts_no_more():
    started = []

    async def main():
        with Pool(2, "minimal", functions={"mark": started.append}) as pool:
            codes = [f"mark({i})\nimport time; time.sleep(15)" for i in range(8)]
            task = asyncio.ensure_future(pool.amap(codes))
            await asyncio.sleep(1.5)
            task.cancel()
            t0 = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - t0 < 6
            await asyncio.sleep(1.0)
            assert len(started) == 2, started  # one per jail; the rest never started
            results = await pool.amap(["print(5)"] * 3)
            assert [r.stdout for r in results] == ["5\n"] * 3
            assert (await pool.arun("print(6)")).stdout == "6\n"

    asyncio.run(main())


def test_pool_amap_keeps_input_order():
    async def main():
        with Pool(2, "minimal") as pool:
            results = await pool.amap([f"import time; time.sleep(0.{9 - i % 3}); print({i})" for i in range(6)])
            assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]

    asyncio.run(main())


def test_the_async_twins_expose_the_sync_attributes():
    for sync, twin in ((Sandbox, AsyncSandbox), (Session, AsyncSession)):
        public = {n for n in dir(sync) if not n.startswith("_")}
        assert public <= {n for n in dir(twin) if not n.startswith("_")}, public - set(dir(twin))
