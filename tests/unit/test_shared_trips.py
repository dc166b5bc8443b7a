"""slots.SharedTrips: the Redis commands a worker's requests ask for meanwhile go as one pipeline,
and each request gets its own reply or error. Redis is a recording stand-in here; the integration
suite runs every slot and rate count of its two workers through the real one."""

import threading
import time

import pytest
import redis

from dce_proxy.slots import SharedTrips


class _Pipeline:
    def __init__(self, server: "_RecordingRedis"):
        self._server = server
        self._commands = []

    def execute_command(self, *command):
        self._commands.append(command)

    def execute(self, raise_on_error=True):
        assert raise_on_error is False  # one command's error is its own request's, not the trip's
        return self._server.trip(self._commands)

    def reset(self):
        self._commands = []


class _RecordingRedis:
    """Answers each command with its last argument, or with what `answer` says; records each trip.
    The first trip waits until `first_trip_may_end` is set."""

    def __init__(self, answer=None):
        self.trips: list[list[tuple]] = []
        self.first_trip_may_end = threading.Event()
        self._answer = answer or (lambda command: command[-1])

    def pipeline(self, transaction=True):
        assert transaction is False
        return _Pipeline(self)

    def trip(self, commands):
        self.trips.append(list(commands))
        if len(self.trips) == 1:
            self.first_trip_may_end.wait(10)
        return [self._answer(command) for command in commands]


def _until(state, what: str):
    deadline = time.monotonic() + 10
    while not state():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def _ask(trips: SharedTrips, command: tuple, replies: dict):
    def ask():
        try:
            replies[command] = trips.call(*command)
        except Exception as error:  # noqa: BLE001 (the test looks at which error)
            replies[command] = error
    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def test_commands_asked_while_a_trip_is_out_go_together_in_the_next_one():
    server = _RecordingRedis()
    trips, replies = SharedTrips(server), {}
    first = _ask(trips, ("ZREM", "dce-slots/a", "lease-0"), replies)
    _until(lambda: server.trips, "the first command was not sent")
    waiting = [_ask(trips, ("ZREM", "dce-slots/b", f"lease-{i}"), replies) for i in range(1, 6)]
    _until(lambda: len(trips._asked) == 5, "the other requests did not ask")
    server.first_trip_may_end.set()
    for thread in (first, *waiting):
        thread.join(10)
    assert [len(trip) for trip in server.trips] == [1, 5]
    assert {command[-1]: reply for command, reply in replies.items()} == {f"lease-{i}": f"lease-{i}" for i in range(6)}


def test_a_commands_error_is_its_own_requests_and_a_lost_trip_fails_all_of_its_requests():
    def answer(command):
        return redis.ResponseError("WRONGTYPE") if command[1] == "bad" else command[-1]

    server = _RecordingRedis(answer)
    server.first_trip_may_end.set()
    trips = SharedTrips(server)
    with pytest.raises(redis.ResponseError):
        trips.call("ZREM", "bad", "lease")
    assert trips.call("ZREM", "good", "lease") == "lease"

    def lost(commands):
        raise redis.ConnectionError("Redis went away")

    server.trip = lost
    with pytest.raises(redis.ConnectionError):
        trips.call("ZREM", "good", "lease")
    server.trip = lambda commands: [command[-1] for command in commands]
    assert trips.call("ZREM", "good", "again") == "again"  # the sender outlived the lost trip
