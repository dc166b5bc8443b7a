"""Name lookups in the gevent workers (dce_proxy/resolver.py): asked anew each time, shared while under way."""

import os
import subprocess
import sys
import threading
import types

import gevent
import gevent.threadpool
import pytest

from conftest import PROXY_DIR
from dce_proxy import resolver


@pytest.fixture
def system_lookups(monkeypatch):
    """The system's getaddrinfo, replaced by one that counts its calls and answers when let go."""

    class Lookups:
        calls = 0
        asked = threading.Semaphore(0)
        let_go = threading.Event()

    def getaddrinfo(host, port, *rest):
        Lookups.calls += 1
        Lookups.asked.release()
        Lookups.let_go.wait(30)
        if host == "gone.invalid":
            raise OSError(-2, "Name or service not known")
        return [(2, 1, 6, "", (f"10.0.0.{Lookups.calls}", port))]

    # The resolver's own view of the system only: other threads of the test process resolve as usual.
    monkeypatch.setattr(resolver, "_socket", types.SimpleNamespace(getaddrinfo=getaddrinfo))
    return Lookups


def test_lookups_asked_at_once_share_one_and_the_next_asks_again(system_lookups):
    lookups = resolver.SharedLookups(gevent.get_hub())
    askers = [gevent.spawn(lookups.getaddrinfo, "vllm", 8000, 0, 1) for _ in range(50)]
    gevent.sleep(0)  # every asker runs until it waits
    assert system_lookups.asked.acquire(timeout=30)
    system_lookups.let_go.set()
    gevent.joinall(askers, raise_error=True)
    assert system_lookups.calls == 1
    assert {asker.value[0][4] for asker in askers} == {("10.0.0.1", 8000)}
    # Nothing kept: a recreated vLLM's new address is found by the next connection.
    assert lookups.getaddrinfo("vllm", 8000, 0, 1)[0][4] == ("10.0.0.2", 8000)
    assert lookups.getaddrinfo("vllm", 8001, 0, 1)[0][4] == ("10.0.0.3", 8001)


def test_a_failed_lookup_fails_every_asker_and_a_killed_one_harms_none(system_lookups):
    lookups = resolver.SharedLookups(gevent.get_hub())
    askers = [gevent.spawn(lookups.getaddrinfo, "gone.invalid", 80) for _ in range(3)]
    gevent.sleep(0)
    assert system_lookups.asked.acquire(timeout=30)
    askers[0].kill()  # a client that left while its lookup was under way
    system_lookups.let_go.set()
    gevent.joinall(askers)
    assert system_lookups.calls == 1
    assert all(isinstance(asker.exception, OSError) for asker in askers[1:])
    with pytest.raises(OSError):
        lookups.getaddrinfo("gone.invalid", 80)
    assert system_lookups.calls == 2


def test_the_workers_use_it():
    # Under the server's config, as a worker: gevent's c-ares resolver cached answers for their DNS
    # lifetime and sent a recreated vLLM's connections to its old address (resolver.py).
    probe = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
             "from gevent import monkey; monkey.patch_all(); import gevent; "
             "print(type(gevent.get_hub().resolver).__name__)")
    env = {name: value for name, value in os.environ.items() if not name.startswith("GEVENT_")}
    done = subprocess.run([sys.executable, "-c", probe, str(PROXY_DIR / "gunicorn.conf.py")], env=env,
                          cwd=PROXY_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SharedLookups", done.stdout


def test_askers_wait_for_a_lookup_the_full_pool_has_not_started(system_lookups):
    hub = gevent.get_hub()
    lookups = resolver.SharedLookups(hub)
    lookups.pool = gevent.threadpool.ThreadPool(1, hub)
    # Its one thread busy and its queue full (gevent queues one task more than it has threads).
    blockers = [lookups.pool.spawn(system_lookups.let_go.wait, 30) for _ in range(2)]
    askers = [gevent.spawn(lookups.getaddrinfo, "vllm", 8000) for _ in range(5)]
    gevent.sleep(0)
    system_lookups.let_go.set()
    for blocker in blockers:
        blocker.get()
    gevent.joinall(askers, raise_error=True)
    assert system_lookups.calls == 1
    lookups.pool.kill()
