"""The README's first example, through the OpenAI Python SDK exactly as a user runs it:
`extra_body` for the length fields, `model_extra["length_control"]` in the answer, streaming,
and a bad field as the SDK's BadRequestError."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

MESSAGES = [{"role": "user", "content": "Describe the sea."}]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_readme_example(client):
    r = client.chat.completions.create(
        model="default", messages=MESSAGES,
        extra_body={"length_target": 12, "length_mode": "equal"})
    lc = r.choices[0].model_extra["length_control"]
    assert lc["length_target"] == 12 and lc["length_mode"] == "equal"
    assert isinstance(lc["predicted_length"], float) and lc["predicted_length"] >= 0
    assert 1 <= r.usage.completion_tokens <= 12 * 1.25 + 1  # equal's overshoot limit


def test_at_most_with_values(client):
    r = client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=64, temperature=1.0,
        extra_body={"length_target": 8, "length_mode": "at_most", "return_length_values": True})
    n = r.usage.completion_tokens
    lc = r.choices[0].model_extra["length_control"]
    assert 1 <= n <= 8
    assert len(lc["values"]) == n and all(0 <= v <= 1 for v in lc["values"])


def test_streaming(client):
    stream = client.chat.completions.create(
        model="default", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True},
        extra_body={"length_target": 6, "length_mode": "at_least", "max_tokens": 6})
    text, controls, usage = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                text.append(choice.delta.content)
            if (choice.model_extra or {}).get("length_control"):
                controls.append(choice.model_extra["length_control"])
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 6  # at_least 6 within max 6
    assert len(controls) == 1 and controls[0]["length_mode"] == "at_least"
    assert "".join(text)


def test_bad_field_is_the_sdks_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=MESSAGES,
                                       extra_body={"length_target": 0})
    assert "length_target" in str(info.value)
