"""Fuzz the request schema of the guided routes: whatever the values, never a 5xx."""

import json

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**7), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.lists(st.integers(-3, 30), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                               max_size=2),
)
plausible_target = st.one_of(st.integers(1, 12), anything)
plausible_mode = st.one_of(st.sampled_from(["equal", "at_most", "at_least"]), anything)
plausible_beta = st.one_of(st.floats(-50, 50), anything)

fields = st.fixed_dictionaries({}, optional={
    "length_target": plausible_target,
    "length_mode": plausible_mode,
    "beta": plausible_beta,
    "return_length_values": st.one_of(st.booleans(), anything),
    "max_tokens": st.one_of(st.integers(0, 12), anything),
    "temperature": st.one_of(st.floats(0, 2), anything),
    "top_k": st.one_of(st.integers(-1, 80), anything),
    "top_p": st.one_of(st.floats(0, 1), anything),
    "n": st.one_of(st.integers(1, 3), anything),
    "stream": st.booleans(),
})


ROUTES = ["/v1/chat/completions", "/v1/completions", "/invocations", "/generate",
          "/generate (sampling_params)"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=fields, route=st.sampled_from(ROUTES))
def test_no_server_errors(server, body, route):
    # Keep each case short: an absent or large max_tokens would decode to the context length.
    if "max_tokens" not in body or (isinstance(body["max_tokens"], int) and body["max_tokens"] > 12):
        body["max_tokens"] = 12
    if route.startswith("/generate"):
        path = "/generate"
        sp = {"max_new_tokens": body.pop("max_tokens"), "stream": body.pop("stream")} \
            if "stream" in body else {"max_new_tokens": body.pop("max_tokens")}
        sp.pop("stream", None)
        if route.endswith("(sampling_params)"):
            sp.update(body)
            body = {}
        payload = json.dumps({"text": "Hi", "sampling_params": sp, **body})
    else:
        path = route
        base = ({"prompt": "Hi"} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "Hi"}]})
        payload = json.dumps({"model": "m", **base, **body})
    r = requests.post(server.url + path, data=payload, timeout=120,
                      headers={"content-type": "application/json"})
    assert r.status_code < 500, (payload, r.status_code, r.text[:500])
    if r.status_code == 400 and r.headers.get("content-type", "").startswith("application/json"):
        assert "message" in r.json() or "detail" in r.json() or "error" in r.json()
