"""Runs inside the proxy container, straight to gunicorn: streams held on both workers, then the
busier worker killed.

argv: PATH BODY MOST EACH AFTER SLOTS_KEY. Opens streams to 127.0.0.1:8000 PATH one at a time, each
only once the one before streams, until every worker holds at least EACH of them (or MOST are open);
a stream that reached a worker already holding EACH, while another holds fewer, is closed and opened again.
Which worker holds a stream is read from the kernel: the worker whose file table has the server side
of that connection. Only open streams count: the test asks for more tokens than the engine makes in a
normal placing, but one that ran its budget while the others took that long to place is left behind
(it ends "done", finish_reason "length"). Then it kills the worker holding the most, counts the live slot
leases of SLOTS_KEY in Redis, and reads every stream on: a stream of the killed worker is read
until its connection ends (what the kernel had buffered may still come); any other must bring AFTER
more events, then it is closed.

Prints one JSON object: {"workers": {pid: [stream ids]}, "victim", "killed_at", "leases_after_kill",
"dropped", "streams": [{"worker", "status", "events", "after_kill", "ending", "finish_reason",
"before_kill", "opened", "first_event", "ended"}]}: ending "continued" | "cut" | "done" | "error" (an
error event, whatever follows it), finish_reason the last one the stream's chunks gave (null if none
did), and times in seconds since this script started.
"""

import http.client
import json
import os
import pathlib
import signal
import socket
import sys
import threading
import time

import redis

PATH, BODY, MOST, EACH, AFTER, SLOTS_KEY = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6]
LIVE_LEASES = "return redis.call('ZCOUNT', KEYS[1], redis.call('TIME')[1], '+inf')"
killed = threading.Event()
START = time.monotonic()


def now() -> float:
    return round(time.monotonic() - START, 2)


class Stream(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.streaming = threading.Event()
        self.events = self.after_kill = 0
        self.ending = None
        self.on_victim = False  # set before the kill: such a stream is read to its end
        self.before_kill = False  # it ended before the kill (its worker was lost some other way)
        self.worker = None  # the worker that held it when it was kept (read again at the end if unseen)
        self.status = None  # the answer's HTTP status (an error answer has no events: it ends "cut")
        self.finish_reason = None  # a stream that ran its whole budget ends "done" with "length"
        self.opened, self.first_event, self.ended = now(), None, None
        self.connection = http.client.HTTPConnection("127.0.0.1", 8000, timeout=600)
        self.connection.request("POST", PATH, BODY, {"Content-Type": "application/json"})
        self.socket = self.connection.sock  # kept: the test may shut it down from another thread
        self.port = self.socket.getsockname()[1]

    def run(self):
        try:
            response = self.connection.getresponse()
            self.status = response.status
            for line in response:
                if line.startswith(b"data: [DONE]"):
                    self.ending = self.ending or "done"
                elif line.startswith(b"data: "):
                    self.events += 1
                    self.first_event = self.first_event or now()
                    self._read(json.loads(line[6:]))
                    self.streaming.set()
                    if killed.is_set():
                        self.after_kill += 1
                        # A killed worker's stream may still hand over what the kernel buffered
                        # before the kill: it is read on until the connection ends.
                        if self.after_kill >= AFTER and not self.on_victim:
                            self.ending = self.ending or "continued"
                            break
            self.ending = self.ending or "cut"
        except (OSError, http.client.HTTPException):
            self.ending = self.ending or "cut"
        finally:
            self.before_kill = not killed.is_set()
            self.ended = now()
            self.streaming.set()
            self.connection.close()

    def _read(self, event: dict):
        # The event's own error object (not a token that reads "error"), or the extension route's
        # form of one: a last chunk that ends with "error".
        reason = (event.get("choices") or [{}])[0].get("finish_reason")
        self.finish_reason = reason if reason is not None else self.finish_reason
        if "error" in event or self.finish_reason == "error":
            self.ending = "error"


def workers() -> list[int]:
    # gunicorn's master is PID 1: its children are the workers.
    return [int(proc.name) for proc in pathlib.Path("/proc").iterdir() if proc.name.isdigit() and parent(proc) == "1"]


def parent(proc: pathlib.Path) -> str | None:
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
    except OSError:  # the process ended meanwhile (a health check, say)
        return None


def worker_of_each(streams: list[Stream]) -> dict[int, int]:
    """Stream index -> the worker pid whose file table holds the server side of its connection."""
    inode_of_port = {}
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, remote_port = (int(address.split(":")[1], 16) for address in fields[1:3])
        if local_port == 8000:
            inode_of_port[remote_port] = fields[9]
    owner = {}
    for pid in workers():
        try:
            fds = list(pathlib.Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                owner[os.readlink(fd)] = pid
            except OSError:
                pass
    return {i: owner.get(f"socket:[{inode_of_port.get(stream.port)}]") for i, stream in enumerate(streams)}


def streams_by_worker(streams: list[Stream]) -> tuple[dict[int, int], dict[int, list[int]]]:
    held = worker_of_each(streams)
    return held, {pid: [i for i, owner in held.items() if owner == pid and streams[i].ending is None]
                  for pid in workers()}


streams: list[Stream] = []
dropped = 0  # streams closed again because they reached a worker that already held its share
held, by_worker = streams_by_worker(streams)
while True:
    stream = Stream()
    stream.start()
    stream.streaming.wait(300)
    # Which worker accepts a connection is the kernel's choice, often the busier one (measured: 19 of
    # 20 on one worker). A stream on a worker that has its share while another lacks some is closed
    # (its slot comes free) and opened again, at most MOST times.
    owner = worker_of_each([stream])[0]
    if dropped < MOST and len(by_worker.get(owner, [])) >= EACH and any(len(ids) < EACH for ids in by_worker.values()):
        stream.socket.shutdown(socket.SHUT_RDWR)
        stream.join(60)
        dropped += 1
        continue
    stream.worker = owner
    streams.append(stream)
    held, by_worker = streams_by_worker(streams)
    if len(streams) >= MOST or all(len(ids) >= EACH for ids in by_worker.values()):
        break

victim = max(by_worker, key=lambda pid: len(by_worker[pid]))
for i in by_worker[victim]:
    streams[i].on_victim = True
killed.set()
killed_at = now()
os.kill(victim, signal.SIGKILL)
with open("/run/secrets/limits_password") as secret:  # the proxy's own, as compose.scale.yaml gives it
    leases = redis.Redis(host="limits", password=secret.read().strip(), driver_info=None).eval(LIVE_LEASES, 1, SLOTS_KEY)
for stream in streams:
    stream.join(600)
print(json.dumps({"workers": by_worker, "victim": victim, "killed_at": killed_at, "leases_after_kill": leases,
                  "dropped": dropped,
                  "streams": [{"worker": s.worker or held[i], "status": s.status, "events": s.events,
                               "after_kill": s.after_kill, "ending": s.ending, "finish_reason": s.finish_reason,
                               "before_kill": s.before_kill, "opened": s.opened, "first_event": s.first_event,
                               "ended": s.ended}
                              for i, s in enumerate(streams)]}))
