"""Any OpenAI SDK works against https://HOST/v1 (here the official Python one)."""

from __future__ import annotations

import openai
import pytest


def test_models(sdk):
    assert [model.id for model in sdk.models.list()] == ["tiny"]


def test_chat(sdk):
    reply = sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=16)
    assert reply.model == "tiny"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0


def test_chat_stream(sdk):
    stream = sdk.chat.completions.create(model="local-model", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=16, stream=True)
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions(sdk):
    reply = sdk.completions.create(model="local-model", prompt="def main():", max_tokens=16, n=2, seed=3)
    assert len(reply.choices) == 2
    again = sdk.completions.create(model="local-model", prompt="def main():", max_tokens=16, n=2, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]  # seeded: reproducible


def test_completions_stream(sdk):
    chunks = list(sdk.completions.create(model="local-model", prompt="x = ", max_tokens=16, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_vllm_errors_reach_the_sdk(sdk):
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="local-model", messages=[{"role": "user", "content": "x " * 40000}],
                                       max_tokens=16)
