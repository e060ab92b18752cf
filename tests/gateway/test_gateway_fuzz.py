"""The gateway's request bodies, fuzzed: whatever a client sends (wrong types, deep nesting, junk
bytes), the answer is a 4xx in the API's own error format (or a 502 naming the upstream), never a
500 and never a hang.  The upstream is a closed port, so a body that passes validation ends in 502."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jailcell.integrations.gateway import Gateway

ENDPOINTS = ["/v1/chat/completions", "/v1/responses", "/api/v1/services/aigc/text-generation/generation"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    from starlette.testclient import TestClient

    gateway = Gateway(f"http://127.0.0.1:{_closed_port()}/v1", policy="minimal", max_steps=2, upstream_retries=0,
                      no_auth=True, allowed_hosts=["testserver"])
    with TestClient(gateway.app, raise_server_exceptions=False, headers={"Content-Type": "application/json"}) as c:
        yield c
    gateway.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
KEYS = ["model", "messages", "input", "tools", "stream", "container", "previous_response_id", "include",
        "instructions", "max_output_tokens", "parameters", "enable_code_interpreter", "store", "tool_choice"]
bodies = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)


def _check(response) -> None:
    assert response.status_code != 500, response.text
    assert response.status_code in (200, 400, 401, 404, 413, 422, 502, 503), (response.status_code, response.text)
    if response.status_code >= 400:
        payload = response.json()
        assert "error" in payload or ("code" in payload and "message" in payload), payload


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, endpoint=st.sampled_from(ENDPOINTS))
def test_any_json_object_body_gets_a_clean_answer(client, body, endpoint):
    _check(client.post(endpoint, json=body))


# Valid requests with one or two fields replaced by anything: the checks past the first ones.
VALID = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                             "tools": [{"type": "code_interpreter"}], "stream": False},
    "/v1/responses": {"model": "m", "input": [{"type": "message", "role": "user",
                                               "content": [{"type": "input_text", "text": "hi"}]}],
                      "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}],
                      "include": ["code_interpreter_call.outputs"], "instructions": "be brief", "store": True},
    "/api/v1/services/aigc/text-generation/generation": {
        "model": "m", "input": {"messages": [{"role": "user", "content": "hi"}]},
        "parameters": {"enable_code_interpreter": True, "result_format": "message", "tools": []}},
}


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw):
    import copy

    endpoint = draw(st.sampled_from(ENDPOINTS))
    body = copy.deepcopy(VALID[endpoint])
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from([p for p in _paths(body) if p]))
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = draw(json_values)
    return endpoint, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated())
def test_valid_bodies_with_wrong_parts_get_a_clean_answer(client, case):
    endpoint, body = case
    _check(client.post(endpoint, json=body))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values, endpoint=st.sampled_from(ENDPOINTS))
def test_any_json_value_body_gets_a_clean_answer(client, body, endpoint):
    _check(client.post(endpoint, content=json.dumps(body)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), endpoint=st.sampled_from(ENDPOINTS))
def test_junk_bytes_get_a_clean_answer(client, raw, endpoint):
    _check(client.post(endpoint, content=raw))


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_nesting_is_a_400(client, endpoint, depth):
    for nested in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        r = client.post(endpoint, content=f'{{"model": "m", "messages": {nested}, "input": {nested}}}')
        assert r.status_code == 400, (r.status_code, r.text[:300])


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_wrong_types_in_known_fields_are_400(client, endpoint):
    cases = [
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "code_interpreter"}],
         "include": 5},
        {"model": "m", "input": "hi", "tools": [5]},
        {"model": "m", "input": [{"role": "user", "content": 7}], "tools": {"type": "code_interpreter"}},
        {"model": "m", "input": {"messages": "hi"}, "parameters": []},
        {"model": 5, "messages": [], "input": []},
        {"model": "m", "messages": [{"role": None}], "input": [None]},
        {"model": "m", "input": "hi", "previous_response_id": ["x"]},
        {"model": "m", "input": "hi", "instructions": {"x": 1}, "max_output_tokens": "many"},
    ]
    for body in cases:
        r = client.post(endpoint, json=body)
        _check(r)
        assert r.status_code in (400, 404, 502), (body, r.status_code, r.text)
