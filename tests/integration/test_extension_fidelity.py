"""What the DCE extension v1.2.0 shows, read exactly as it reads (wire.py), from the real engine
through Caddy: every token, every error as text in the tab, and no tab lost to a busy GPU (issue 11)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from stack import LONG_STREAM_TOKENS, THINK_END_ID
from wire import HELD_STREAM_READ_PAUSE, SILENCE_LIMIT, extension_body, post_like_extension, wait_until

BATCH = 10  # the extension fires one request per tab
CAP = 20  # DCE_MAX_CONCURRENT in the test stack (the default)


def _tab_bodies(max_tokens: int, **extra) -> list[dict]:
    return [extension_body(f"Tab {i}: summarise the repository.", max_tokens=max_tokens, seed=i, **extra)
            for i in range(BATCH)]


def _as_sent_to_vllm(body: dict) -> dict:
    return {**body, "model": "tiny"}  # the proxy maps the extension's "local-model" to the served model


class Tabs:
    """A batch of tabs streaming at once; each can be watched (`streaming`) and closed (`close`)."""

    def __init__(self, stack, url: str, bodies: list[dict], *, held: bool = False):
        self._read_pause = HELD_STREAM_READ_PAUSE if held else 0.0
        self.streaming = [threading.Event() for _ in bodies]
        self.live = [None] * len(bodies)  # each tab's result as it grows
        self._closed = [threading.Event() for _ in bodies]
        self._pool = ThreadPoolExecutor(len(bodies))
        self.futures = []
        for i, body in enumerate(bodies):
            self.futures.append(self._pool.submit(self._run, stack, url, body, i))
            if held:  # one at a time: twenty TLS handshakes at once starve this machine's second core
                self.streaming[i].wait(120)

    def _run(self, stack, url, body, index):
        def on_chunk(result):
            self.live[index] = result
            if result.chunks:
                self.streaming[index].set()
                time.sleep(self._read_pause)
            return not self._closed[index].is_set()

        try:
            with stack.session() as session:
                return post_like_extension(session, url, body, on_chunk=on_chunk)
        finally:
            self.streaming[index].set()  # also a tab that failed: the test then reads why

    def close(self, index: int) -> None:
        self._closed[index].set()

    def close_all(self) -> None:
        for event in self._closed:
            event.set()

    def results(self):
        """Each tab's result once it ended (by itself, or closed by the test)."""
        results = [future.result() for future in self.futures]
        self._pool.shutdown()
        return results

    def wait_all_streaming(self) -> None:
        assert all(event.wait(120) for event in self.streaming), "a tab never started"
        ended = [future.result() for future in self.futures if future.done()]
        assert not ended, f"tabs ended before the test acted: {ended}"


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


def test_a_tab_over_the_cap_waits_for_a_slot_then_completes(stack):
    url = f"{stack.base}/k/{stack.load_keys[1]}/api/dce/proxy"
    # The cap's worth of tabs that cannot end by themselves: the test closes them.
    holders = Tabs(stack, url, [extension_body(f"Hold {i}.", max_tokens=LONG_STREAM_TOKENS, ignore_eos=True)
                                for i in range(CAP)], held=True)
    try:
        holders.wait_all_streaming()
        waiting = Tabs(stack, url, [extension_body("One more tab.", max_tokens=16, seed=1)])
        # Queued: answered at once (headers and a heartbeat keep the extension's socket alive), no token yet.
        wait_until(lambda: waiting.futures[0].done() or (waiting.live[0] and waiting.live[0].heartbeats), 60,
                   "the tab over the cap to be answered with a heartbeat", interval=0.1)
        assert not waiting.futures[0].done(), waiting.futures[0].result()
        assert waiting.live[0].chunks == 0
        holders.close(0)  # one tab of the batch closed: its slot goes to the waiting one
        (result,) = waiting.results()
    finally:
        holders.close_all()
        holder_results = holders.results()
    assert result.status == 200 and result.failure is None, result
    # Its text: the tiny model thinks first (the extension asks for reasoning_effort).
    assert result.finish_reason == "length" and result.content + result.reasoning and result.heartbeats >= 1
    assert all(r.status == 200 and r.failure is None for r in holder_results), holder_results


@pytest.mark.disruptive
def test_a_silent_engine_for_longer_than_the_extensions_timeout_loses_no_tab(stack):
    # Long enough that every tab is mid-answer when vLLM is frozen, short enough to finish after.
    bodies = _tab_bodies(3000, ignore_eos=True)
    tabs = Tabs(stack, f"{stack.base}/k/{stack.key}/api/dce/proxy", bodies)
    vllm = stack.container("vllm")
    try:
        tabs.wait_all_streaming()
        vllm.pause()
        # The one wait for an amount of time in this suite: a silence longer than the extension
        # tolerates is the condition under test (as a long prefill or a full queue looks from outside).
        time.sleep(SILENCE_LIMIT + 10)
    finally:
        vllm.reload()
        if vllm.status == "paused":
            vllm.unpause()
    for result in tabs.results():  # each ends by itself: 3000 tokens, then [DONE]
        assert result.status == 200 and result.failure is None, result
        assert result.finish_reason == "length" and result.saw_done
        assert result.heartbeats >= 4  # at least one per 15 s of the silence
