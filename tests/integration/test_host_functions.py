"""Host functions: callables on the host that sandboxed code calls like local functions."""

import asyncio
import threading
import time

import pytest

from jailcell import AsyncSandbox, InputError, Pool, Sandbox
from jailcell._injail import _protocol as proto

from ..conftest import OPEN_POLICY


class QuotaExceeded(Exception):
    pass


CALLS = []


def search(query, limit=2):
    CALLS.append((query, limit))
    return [{"title": f"{query} {i}", "score": i / 2} for i in range(limit)]


def lookup(key):
    return {"a": 1}[key]


def over_quota():
    raise QuotaExceeded("daily quota used up")


def returns_set():
    return {1, 2}


def slow(seconds):
    time.sleep(seconds)
    return "late"


def big():
    return "x" * (1 << 20)


async def double(x):
    await asyncio.sleep(0)
    return x * 2


FUNCTIONS = {"search": search, "lookup": lookup, "over_quota": over_quota, "returns_set": returns_set,
             "slow": slow, "double": double, "big": big}


@pytest.fixture(scope="module")
def sb():
    with Sandbox(OPEN_POLICY, functions=FUNCTIONS, timeout=5, memory=256, warm=True) as sandbox:
        yield sandbox


def test_values_travel_as_json(sb):
    r = sb.run("hits = search('jail', limit=3)\nprint(type(hits).__name__, hits[2]['title'])\nhits[1]['score']")
    assert r.ok and r.stdout == "list jail 2\n" and r.result == "0.5"
    assert CALLS[-1] == ("jail", 3)
    assert sb.run("double(21)").result == "42"  # async host functions are awaited
    assert sb.run("search.__name__, callable(search)").result == "('search', True)"


def test_exceptions_come_back_with_type_and_message(sb):
    r = sb.run("try:\n    lookup('zzz')\nexcept KeyError as e:\n    print('KeyError', e.args[0])")
    assert r.stdout == "KeyError zzz\n"
    r = sb.run("over_quota()")
    assert r.status == "error" and r.error["type"] == "QuotaExceeded" and r.error["message"] == "daily quota used up"
    r = sb.run("returns_set()")
    assert r.error["type"] == "TypeError" and "not a JSON value" in r.error["message"]


def test_arguments_must_be_json(sb):
    r = sb.run("search({1, 2})")
    assert r.error["type"] == "TypeError" and "JSON values" in r.error["message"]
    r = sb.run("search('x' * (9 * 1024 * 1024))")
    assert r.error["type"] == "ValueError" and "limit" in r.error["message"]


# jailcell's protocol module is not importable in a cell: programs that forge frames make their own.
FRAMING = ("import json, os, struct\n"
           "def encode(obj):\n"
           "    body = json.dumps(obj).encode()\n"
           f"    return struct.pack('>2sBBI', b'JC', {proto.VERSION}, 1, len(body)) + body\n"
           "def read_frame(fd):\n"
           "    n = struct.unpack('>2sBBI', os.read(fd, 8))[3]\n"
           "    data = b''\n"
           "    while len(data) < n:\n"
           "        data += os.read(fd, n - len(data))\n"
           "    return json.loads(data)\n")


def test_unknown_and_forged_calls_never_reach_anything_else(sb):
    assert sb.run("nothere()").error["type"] == "NameError"
    # A program that writes call frames itself, naming something that is not a host function.
    forged = (FRAMING + "os.write(3, encode({'call': 'exec', 'args': ['import os'], 'kwargs': {}}))\n"
              "print(read_frame(3))")
    r = sb.run(forged)
    assert r.ok and "NameError" in r.stdout and "'exec' is not defined" in r.stdout
    malformed = (FRAMING + "os.write(3, encode({'call': 'search', 'args': {'not': 'a list'}, 'kwargs': []}))\n"
                 "print(read_frame(3))")
    assert "malformed call" in sb.run(malformed).stdout
    bad_header = "import os\nos.write(3, b'XXXXXXXX' + b'{\"call\":\"search\"}')\nimport time\ntime.sleep(5)"
    r = sb.run(bad_header)
    assert r.error["type"] == "HostFunctionMisuse" and "malformed" in r.error["message"], r
    assert sb.run("print(1)").stdout == "1\n"  # the jail is fine afterwards


def test_flooding_the_bridge(sb):
    # Many calls in a row: bounded per run, and the zygote keeps serving.
    r = sb.run("n = 0\ntry:\n    while True:\n        search('x', limit=0)\n        n += 1\nexcept RuntimeError as e:\n"
               "    print(n, e)", timeout=30)
    assert r.ok and r.stdout.startswith("10000 host function call limit reached"), r
    # Frames pushed without reading the answers: the cell blocks, the wall clock ends it.
    flood = (FRAMING + "frame = encode({'call': 'search', 'args': ['y'], 'kwargs': {}})\n"
             "while True:\n    os.write(3, frame)")
    r = sb.run(flood, timeout=3)
    assert r.status == "timeout" or r.error["type"] == "HostFunctionMisuse", r
    assert "(enforced by the host)" not in r.error["message"]  # the zygote stayed in control
    # Calls whose (large) answers are never read: the cell is stopped, the zygote's buffer stays bounded.
    unread = flood.replace("'search', 'args': ['y']", "'big', 'args': []")
    r = sb.run(unread, timeout=10)
    assert r.error["type"] == "HostFunctionMisuse" and "does not read" in r.error["message"], r
    assert sb.run("search('z', limit=1)[0]['title']").result == "'z 0'"


def test_host_time_counts_against_the_wall_clock(sb):
    t0 = time.monotonic()
    r = sb.run("slow(3)", timeout=1)
    assert r.status == "timeout" and time.monotonic() - t0 < 6
    assert sb.run("slow(0)").result == "'late'"  # the late answer of the killed run was discarded


def test_sessions_pools_threads_and_async():
    with Sandbox("minimal", functions={"search": search}) as sb, sb.session() as s:
        s.run("first = search('s', limit=1)")
        assert s.run("first[0]['title'], len(search('t', limit=4))").result == "('s 0', 4)"
    with Pool(2, "minimal", functions={"double": double}) as pool:
        assert [r.result for r in pool.map([f"double({i})" for i in range(6)])] == [str(2 * i) for i in range(6)]

    async def main():
        async with AsyncSandbox("minimal", functions={"double": double, "search": search}) as asb:
            results = await asyncio.gather(*(asb.run(f"double({i})") for i in range(4)))
            return [r.result for r in results]

    assert asyncio.run(main()) == ["0", "2", "4", "6"]
    seen = []
    with Sandbox("minimal", functions={"who": lambda: threading.current_thread().name}) as sb:
        threads = [threading.Thread(target=lambda: seen.append(sb.run("who()").result), name=f"t{i}") for i in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert sorted(seen) == ["'t0'", "'t1'", "'t2'"]  # each runs in the thread that called run()


def test_bad_function_mappings_are_refused():
    with pytest.raises(InputError, match="identifier"):
        Sandbox("minimal", functions={"not a name": print})
    with pytest.raises(InputError, match="not callable"):
        Sandbox("minimal", functions={"x": 3})
    with pytest.raises(InputError, match="mapping"):
        Sandbox("minimal", functions=[print])
