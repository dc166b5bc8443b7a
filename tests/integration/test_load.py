"""200 concurrent streams through Caddy for over a minute: no error, and every stream's text is
byte-identical to what vLLM itself streams for the same greedy request (issue 4)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import figures

from dce_client import extension_body, post_like_extension

STREAMS = 200
PROMPTS = 8  # distinct prompts, so a stream that got another's tokens shows
MIN_HOLD_SECONDS = 60
# Tokens per stream that keep 200 streams of the tiny CPU model busy for over a minute here.
MAX_TOKENS = 1200


def _body(index: int, *, for_vllm: bool = False) -> dict:
    prompt = f"Prompt {index}: describe file number {index * 7919} of the repository."
    # Greedy and ignore_eos: the CPU engine then gives the same text every time, at full length.
    body = extension_body(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0)
    if for_vllm:
        body["model"] = "tiny"
    return body


def test_200_streams_for_a_minute_lose_nothing(stack):
    url = f"{stack.base}/k/{stack.key}/api/dce/proxy"
    reference_code = (Path(__file__).parent / "direct_reference.py").read_text()
    reference = {}

    def direct():
        result = stack.container("proxy").exec_run(
            ["python3", "-c", reference_code],
            environment={"DCE_REFERENCE_BODIES": json.dumps([_body(i, for_vllm=True) for i in range(PROMPTS)])})
        reference["output"] = result.output.decode()
        reference["exit_code"] = result.exit_code

    def through_caddy(index: int):
        with stack.session() as session:
            return post_like_extension(session, url, _body(index % PROMPTS))

    started = time.monotonic()
    # The direct streams run in the same window, so vLLM batches both alike.
    reference_thread = threading.Thread(target=direct)
    reference_thread.start()
    with ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(through_caddy, range(STREAMS)))
    held = time.monotonic() - started
    reference_thread.join(timeout=600)

    assert reference.get("exit_code") == 0, reference
    expected = json.loads(reference["output"])
    errors = [result.errors for result in results if result.status != 200 or result.errors]
    assert not errors, f"{len(errors)} streams failed, first: {errors[0]}"
    assert held >= MIN_HOLD_SECONDS, f"the load lasted only {held:.0f} s: raise MAX_TOKENS"
    compared = 0
    for index, result in enumerate(results):
        assert result.finish_reason == "length" and result.saw_done
        assert result.content == expected[index % PROMPTS], f"stream {index} differs from vLLM's own text"
        compared += len(result.content.encode())
    figures.add("stream_seconds", STREAMS * held)
    figures.add("bytes_compared", compared)
