"""Any OpenAI client (issue 17), on the real stack (Caddy, proxy, vLLM's CPU engine): the Responses
API and tool calls through the official SDK, the utility routes, what stays 404, CORS through
Caddy, and the README's examples, run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import openai
import pytest

from stack import CORS_ORIGIN, REPO
from unit_helpers import assert_error
from wire import extension_body, parse_sse

# A tool whose arguments vLLM must constrain to a small JSON schema (the model's weights are random).
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
QUESTION = [{"role": "user", "content": "Weather in Paris for three days?"}]


def test_a_response_answers(sdk):
    reply = sdk.responses.create(model="local-model", input="What is a mutex?", max_output_tokens=32)
    assert reply.model == "tiny" and reply.status in ("completed", "incomplete")
    assert reply.output and reply.usage.output_tokens > 0


def test_a_streamed_response_arrives_whole_and_in_order(sdk):
    events = list(sdk.responses.create(model="local-model", input="What is a mutex?", max_output_tokens=32,
                                       stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert streamed and streamed == events[-1].response.output_text


def test_a_required_named_tool_call_has_arguments_that_parse(sdk):
    stream = sdk.chat.completions.create(model="local-model", messages=QUESTION, tools=[WEATHER], tool_choice=NAMED,
                                         max_tokens=64, stream=True)
    calls = [call for chunk in stream if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "get_weather"
    arguments = json.loads("".join(call.function.arguments or "" for call in calls))
    assert arguments["city"] in ("Paris", "Lyon") and 1 <= arguments["days"] <= 7


def test_tool_call_deltas_reach_the_extension_route_and_its_end_chunk_is_empty(stack, session):
    # Without reasoning_effort: thinking would put the tool call after a </think> the random model
    # may never write.
    body = extension_body("Weather in Paris?", tools=[WEATHER], tool_choice=NAMED, max_tokens=64,
                          reasoning_effort=None)
    response = session.post(f"{stack.base}/k/{stack.key}/api/dce/proxy", json=body, timeout=120)
    chunks = [json.loads(event) for event in parse_sse(response.content).events if event != "[DONE]"]
    choices = [chunk["choices"][0] for chunk in chunks if chunk.get("choices")]
    ended = [choice for choice in choices if choice.get("finish_reason", "missing") is not None]
    assert len(ended) == 1 and ended[0] is choices[-1] and ended[0]["delta"] == {}
    arguments = "".join(call["function"].get("arguments", "") for choice in choices
                        for call in choice["delta"].get("tool_calls") or [])
    assert json.loads(arguments)["city"] in ("Paris", "Lyon")


def test_embeddings_of_the_chat_model_are_a_clear_404(sdk):
    with pytest.raises(openai.NotFoundError) as refused:
        sdk.embeddings.create(model="local-model", input="hi")
    assert refused.value.code == "unsupported_by_model"


def test_tokenize_counts_a_prompts_tokens(stack, session):
    response = session.post(f"{stack.base}/tokenize", json={"model": "local-model", "prompt": "How many?"},
                            headers={"Authorization": f"Bearer {stack.key}"}, timeout=30)
    assert response.status_code == 200 and response.json()["count"] == len(response.json()["tokens"]) > 0


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/reset_prefix_cache", "/sleep", "/collective_rpc",
                                  "/pause", "/start_profile"])
def test_vllms_operator_routes_stay_404(stack, session, path):
    response = session.post(f"{stack.base}{path}", json={}, headers={"Authorization": f"Bearer {stack.key}"},
                            timeout=30)
    assert_error(response, 404)


@pytest.mark.parametrize("origin, allowed", [(CORS_ORIGIN, True), ("https://evil.example", False)])
def test_a_preflight_passes_only_from_the_listed_origin(stack, session, origin, allowed):
    response = session.options(f"{stack.base}/v1/responses", timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert response.status_code == 200
    assert response.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)


def readme_examples() -> dict[str, tuple[str, str]]:
    """The README's examples: name -> (language, code), each after a `<!-- example: NAME -->` line."""
    text = (REPO / "README.md").read_text()
    found = re.findall(r"<!-- example: ([\w-]+) -->\n```(\w+)\n(.*?)```", text, re.DOTALL)
    return {name: (language, code) for name, language, code in found}


def test_the_readme_has_the_examples_issue_17_asks_for():
    assert set(readme_examples()) == {"curl", "python-responses", "python-tools"}


@pytest.mark.parametrize("name", ["curl", "python-responses", "python-tools"])
def test_a_readme_example_runs_as_written(stack, name):
    language, code = readme_examples()[name]
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" else [sys.executable, "-c", code]
    env = {**os.environ, "DCE_URL": stack.base, "DCE_KEY": stack.key, "CURL_CA_BUNDLE": stack.ca_file,
           "SSL_CERT_FILE": stack.ca_file}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert result.stdout.strip()
