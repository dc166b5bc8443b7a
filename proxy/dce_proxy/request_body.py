"""Reading and checking request bodies, and fitting them to what vLLM serves."""

from __future__ import annotations

import json
import math
from numbers import Real
from typing import Callable

from flask import request

from .config import settings
from .errors import ApiError, bad_request, invalid
from .upstream import ModelInfo, upstream


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def json_object() -> dict:
    """The request body as a JSON object, or a 400/413/415 saying what is wrong with it."""
    if request.mimetype != "application/json":
        raise ApiError(415, "Send the body as JSON with 'Content-Type: application/json'.",
                       "invalid_request_error", "unsupported_media_type")
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        # The decoder's message names a position, never the content.
        message = str(exc) if isinstance(exc, json.JSONDecodeError) else "the body is not valid UTF-8 JSON"
        raise bad_request(f"Malformed JSON: {message}.") from None
    if not isinstance(body, dict):
        raise bad_request("The JSON body must be an object.")
    return body


def integer(body: dict, name: str, *, low: int, high: int | None = None, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:  # absent and null both mean "the default"
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"'{name}' must be an integer.")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(name, f"'{name}' must be {bound}, got {value}.")
    return value


def number(body: dict, name: str, *, low: float, high: float, low_inclusive: bool = True) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise invalid(name, f"'{name}' must be a number.")
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high:
        raise invalid(name, f"'{name}' must be between {low} and {high}, got {value}.")
    return float(value)


def boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be true or false.")
    return value


def string(body: dict, name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise invalid(name, f"'{name}' must be a non-empty string." if required else f"'{name}' must be a string.")
    return value


def stop_sequences(body: dict) -> str | list[str] | None:
    value = body.get("stop")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise invalid("stop", "'stop' must be a string or a list of strings.")


def check_messages(body: dict) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list of {role, content} objects.")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid("messages", "Each message must be an object with a string 'role'.")


def check_prompt(body: dict) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt):
        return
    raise invalid("prompt", "'prompt' must be a string or a non-empty list.")


def check_input(body: dict) -> None:
    """A Responses API request's input: a text, or a non-empty list of items; never in the
    background, which would run on in vLLM after its generation slot was freed."""
    value = body.get("input")
    if not (isinstance(value, str) or (isinstance(value, list) and value)):
        raise invalid("input", "'input' must be a string or a non-empty list of input items.")
    if boolean(body, "background"):
        raise invalid("background", "'background' is not served: a response runs while its request is open.")


def map_model(body: dict, models: ModelInfo) -> None:
    """Any requested model name becomes a served one (an alias's target, else the default model)."""
    requested = body.get("model")
    if requested is not None and not isinstance(requested, str):
        raise invalid("model", "'model' must be a string.")
    model = settings().model_aliases.get(requested or "", requested)
    body["model"] = model if model in models.served else models.default


# A generation's token budget, as chat, completions and the Responses API name it.
_TOKEN_BUDGETS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def generation_body(check: Callable[[dict], None]) -> dict:
    """The request's body for a generation: checked by `check` (its route's own fields) and as any
    generation is, then fitted to the served model."""
    body = json_object()
    check(body)
    _check_sequences(body, settings().max_n)
    boolean(body, "stream")
    for name in _TOKEN_BUDGETS:
        integer(body, name, low=1)
    return fit_to_model(body, upstream().models())


def fit_to_model(body: dict, models: ModelInfo) -> dict:
    """Maps any requested model name to a served one and lowers a checked body's token budgets to
    the model's context. Clients like the DCE extension ask for "local-model" and 16384 tokens
    whatever is served; vLLM would answer 404 and 400 to those."""
    map_model(body, models)
    limit = models.max_model_len.get(body["model"])
    for name in _TOKEN_BUDGETS:
        if limit and isinstance(body.get(name), int) and body[name] > limit:
            body[name] = limit
    return body


# OpenAI's own bounds: completions return at most 5 log-probabilities per token, chat 20.
_MAX_COMPLETION_LOGPROBS = 5
_MAX_TOP_LOGPROBS = 20


def _check_sequences(body: dict, max_n: int) -> None:
    """What one request may make the GPU do: n x prompts sequences at most DCE_MAX_N (the in-flight
    cap counts requests, so a list of prompts must not be a way around it), and bounded
    log-probabilities. Log-probabilities of the whole prompt (prompt_logprobs, or echo with
    logprobs) are refused."""
    n = integer(body, "n", low=1, high=max_n) or 1
    prompts = _prompt_count(body.get("prompt"))
    if n * prompts > max_n:
        raise invalid("prompt", f"'n' times the number of prompts must be at most {max_n}, got {n} x {prompts}.")
    if not isinstance(body.get("logprobs"), bool):  # chat's logprobs is a switch, completions' a count
        integer(body, "logprobs", low=0, high=_MAX_COMPLETION_LOGPROBS)
    integer(body, "top_logprobs", low=0, high=_MAX_TOP_LOGPROBS)
    if body.get("prompt_logprobs") is not None:
        raise invalid("prompt_logprobs", "'prompt_logprobs' is not served: it would return the whole prompt's "
                                         "log-probabilities.")
    # vLLM answers echo with log-probabilities by computing them for the whole prompt too.
    asks_logprobs = body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0)
    if boolean(body, "echo") and asks_logprobs:
        raise invalid("echo", "'echo' with log-probabilities is not served: it would return the whole prompt's "
                              "log-probabilities.")


def _prompt_count(prompt) -> int:
    """Prompts in a completions request: a string or a list of token ids is one, any other list one each."""
    if isinstance(prompt, list) and prompt and not all(isinstance(item, int) for item in prompt):
        return len(prompt)
    return 1
