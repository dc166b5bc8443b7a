"""Tabs of the DCE extension held open by a test: a batch sent at once, each read as the extension
reads it (wire.open_held_tab), watched while it runs and closed like the stop button."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from wire import open_held_tab


class Tabs:
    """A batch of tabs sent at once (wire.open_held_tab); each can be watched (`live`, `streaming`)
    and closed (`close_all`)."""

    def __init__(self, stack, url: str, bodies: list[dict]):
        self.streaming = [threading.Event() for _ in bodies]  # its first token came (or it ended)
        self.live = [None] * len(bodies)  # each tab's result as it grows
        self._closed = threading.Event()
        self._pool = ThreadPoolExecutor(len(bodies))
        self.futures = [self._pool.submit(self._run, stack, url, body, i) for i, body in enumerate(bodies)]

    def _run(self, stack, url, body, index):
        def on_chunk(result):
            self.live[index] = result
            if result.chunks:
                self.streaming[index].set()
            return not self._closed.is_set()

        try:
            return open_held_tab(stack.session, url, body, on_chunk=on_chunk)
        finally:
            self.streaming[index].set()  # also a tab that failed: the test then reads why

    def close_all(self) -> None:
        """Like the stop button on every tab: each socket closes when its next bytes arrive."""
        self._closed.set()

    def ended(self) -> list:
        return [future.result() for future in self.futures if future.done()]

    def results(self) -> list:
        """Each tab's result once it ended (by itself, or closed by the test)."""
        results = [future.result() for future in self.futures]
        self._pool.shutdown()
        return results
