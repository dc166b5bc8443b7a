"""What the DCE extension v1.2.0 shows, read exactly as it reads (wire.py), from the real engine
through Caddy: every token, and reasoning apart from the answer (issue 11). A cut stream's error
shown in the tab: test_limits_and_faults.py (vLLM killed mid-stream)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from stack import THINK_END_ID
from wire import extension_body, post_like_extension

BATCH = 10  # the extension fires one request per tab


def _tab_bodies(max_tokens: int, **extra) -> list[dict]:
    return [extension_body(f"Tab {i}: summarise the repository.", max_tokens=max_tokens, seed=i, **extra)
            for i in range(BATCH)]


def _as_sent_to_vllm(body: dict) -> dict:
    return {**body, "model": "tiny"}  # the proxy maps the extension's "local-model" to the served model


def test_ten_tabs_show_exactly_what_vllm_generated(stack):
    # A small budget: every tab ends on its length cap, and vLLM sends that last token together
    # with the finish reason. The extension must still show it.
    bodies = _tab_bodies(40)
    with stack.session() as session, ThreadPoolExecutor(BATCH) as pool:
        url = f"{stack.base}/k/{stack.key}/api/dce/proxy"
        results = list(pool.map(lambda body: post_like_extension(session, url, body), bodies))
    expected = stack.direct_answers([_as_sent_to_vllm(body) for body in bodies])
    for result, direct in zip(results, expected):
        assert result.status == 200 and result.failure is None, result
        assert result.finish_reason == "length" and result.saw_done
        # The tiny model thinks (the extension asks for reasoning_effort): its text is mostly reasoning.
        shown = {"content": result.content, "reasoning": result.reasoning}
        assert direct["content"] + direct["reasoning"] and shown == direct, (shown, direct)


def test_reasoning_arrives_as_reasoning_content_apart_from_the_answer(stack, session):
    # The tiny model thinks when asked to (the extension's reasoning_effort); a bias towards </think>
    # makes it stop thinking after a few tokens, so the answer has text too. Seeded: the same tokens as direct.
    body = extension_body("Think first.", max_tokens=64, seed=3, logit_bias={str(THINK_END_ID): 4})
    result = post_like_extension(session, f"{stack.base}/k/{stack.key}/api/dce/proxy", body)
    (direct,) = stack.direct_answers([_as_sent_to_vllm(body)])
    assert direct["reasoning"] and direct["content"], direct  # the engine did split them
    assert result.failure is None and result.finish_reason == "length", result
    assert (result.reasoning, result.content) == (direct["reasoning"], direct["content"])
