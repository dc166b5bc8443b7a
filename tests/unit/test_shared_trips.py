"""shared_trips.SharedTrips: the Redis commands a worker's requests ask for meanwhile go as one pipeline,
and each request gets its own reply or error. Redis is a recording stand-in here; the integration
suite takes and frees every slot of its two workers through the real one."""

import threading
import time

import redis

from dce_proxy.shared_trips import SharedTrips


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
    A trip waits while `may_answer` is clear; while `lose_trips` is set, a trip is lost."""

    def __init__(self, answer=None):
        self.trips: list[list[tuple]] = []
        self.may_answer = threading.Event()
        self.may_answer.set()
        self.lose_trips = False
        self._answer = answer or (lambda command: command[-1])

    def pipeline(self, transaction=True):
        assert transaction is False
        return _Pipeline(self)

    def trip(self, commands):
        self.trips.append(list(commands))
        self.may_answer.wait(10)
        if self.lose_trips:
            raise redis.ConnectionError("Redis went away")
        return [self._answer(command) for command in commands]


def _until(state, what: str):
    deadline = time.monotonic() + 10
    while not state():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def _ask_while_a_trip_is_out(server: _RecordingRedis, trips: SharedTrips, first: tuple, others: list[tuple],
                             replies: dict) -> list[threading.Thread]:
    """`first` goes alone; `others` are asked while its trip is out; then Redis answers."""
    server.may_answer.clear()
    sent = len(server.trips)
    threads = [_ask(trips, first, replies)]
    _until(lambda: len(server.trips) > sent, "the first command was not sent")
    threads += [_ask(trips, command, replies) for command in others]
    _until(lambda: len(trips._asked) == len(others), "the other requests did not ask")
    server.may_answer.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive(), "a request got no reply"
    return threads


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
    _ask_while_a_trip_is_out(server, trips, ("ZREM", "dce-slots/a", "lease-0"),
                             [("ZREM", "dce-slots/b", f"lease-{i}") for i in range(1, 6)], replies)
    assert [len(trip) for trip in server.trips] == [1, 5]
    assert {command[-1]: reply for command, reply in replies.items()} == {f"lease-{i}": f"lease-{i}" for i in range(6)}


def test_a_commands_error_is_its_own_requests_and_a_lost_trip_fails_all_of_its_requests():
    def answer(command):
        return redis.ResponseError("WRONGTYPE") if command[1] == "bad" else command[-1]

    server = _RecordingRedis(answer)
    trips, replies = SharedTrips(server), {}
    _ask_while_a_trip_is_out(server, trips, ("ZREM", "first", "lease-0"),
                             [("ZREM", "bad", "lease-1"), ("ZREM", "good", "lease-2")], replies)
    assert [len(trip) for trip in server.trips] == [1, 2]
    assert isinstance(replies[("ZREM", "bad", "lease-1")], redis.ResponseError)
    assert replies[("ZREM", "good", "lease-2")] == "lease-2"

    server.lose_trips, replies = True, {}
    _ask_while_a_trip_is_out(server, trips, ("ZREM", "good", "lost-0"),
                             [("ZREM", "good", f"lost-{i}") for i in range(1, 4)], replies)
    assert [len(trip) for trip in server.trips[2:]] == [1, 3]
    errors = list(replies.values())
    assert len(errors) == 4 and all(isinstance(error, redis.ConnectionError) for error in errors)
    assert len({id(error) for error in errors}) == 4  # each raised once: no request's frames pile up on another's
    server.lose_trips = False
    assert trips.call("ZREM", "good", "again") == "again"  # the sender outlived the lost trip


def test_requests_that_ask_first_all_at_once_start_one_sender():
    def senders():
        return sum(thread.name == "dce-redis-trips" for thread in threading.enumerate())

    server = _RecordingRedis()
    trips, replies, before = SharedTrips(server), {}, senders()
    start = threading.Barrier(16)

    def ask(i):
        start.wait(10)
        replies[i] = trips.call("ZREM", "dce-slots/a", f"lease-{i}")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert replies == {i: f"lease-{i}" for i in range(16)}
    assert senders() - before == 1
