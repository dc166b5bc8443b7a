"""Any OpenAI SDK works against https://HOST/v1 (here the official Python one)."""

from __future__ import annotations

import ssl

import openai
import pytest


@pytest.fixture()
def client(stack):
    with openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=stack.ca_file)) as http_client:
        yield openai.OpenAI(base_url=f"{stack.base}/v1", api_key=stack.key, http_client=http_client, max_retries=0)


def test_models(client):
    assert [model.id for model in client.models.list()] == ["tiny"]


def test_chat(client):
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=16)
    assert reply.model == "tiny"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0


def test_chat_stream(client):
    stream = client.chat.completions.create(model="local-model", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=16, stream=True)
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions(client):
    reply = client.completions.create(model="local-model", prompt="def main():", max_tokens=16, n=2, seed=3)
    assert len(reply.choices) == 2
    again = client.completions.create(model="local-model", prompt="def main():", max_tokens=16, n=2, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]  # seeded: reproducible


def test_completions_stream(client):
    chunks = list(client.completions.create(model="local-model", prompt="x = ", max_tokens=16, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_vllm_errors_reach_the_sdk(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="local-model", messages=[{"role": "user", "content": "x " * 40000}],
                                       max_tokens=16)
