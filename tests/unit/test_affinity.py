"""The conversation id the proxy sends the vLLM router (affinity.py): a DCE batch stays on one
replica, another prompt may go to another, and the id gives away neither the key nor the text."""

import pytest

from dce_proxy.affinity import SESSION_HEADER, session_id
from unit_helpers import ALICE_KEY, BOB_KEY, DCE_EXTENSION_BODY, bearer

CHAT = [{"role": "system", "content": "You review code."}, {"role": "user", "content": "Is this safe?"}]


@pytest.mark.parametrize("start", [CHAT, CHAT[1:]], ids=["system prompt", "question only"])
def test_every_tab_of_a_batch_and_every_later_turn_names_the_same_conversation(start):
    first = session_id("alice", {"messages": start, "temperature": 0.2})
    assert session_id("alice", {"messages": start, "temperature": 1.0, "seed": 7}) == first
    later_turn = start + [{"role": "assistant", "content": "Mostly."}, {"role": "user", "content": "Why?"}]
    assert session_id("alice", {"messages": later_turn}) == first


@pytest.mark.parametrize("other_key, other_body", [
    ("bob", {"messages": CHAT}),  # another key, same text
    ("alice", {"messages": [CHAT[0], {"role": "user", "content": "Is that safe?"}]}),  # another prompt
    ("alice", {"prompt": "Is this safe?"}),  # a completion
])
def test_another_key_or_prompt_is_another_conversation(other_key, other_body):
    assert session_id(other_key, other_body) != session_id("alice", {"messages": CHAT})


def test_a_responses_conversation_is_named_by_its_instructions_and_first_input():
    first = session_id("alice", {"instructions": "You review code.", "input": CHAT[1:]})
    later_turn = CHAT[1:] + [{"role": "assistant", "content": "Mostly."}, {"role": "user", "content": "Why?"}]
    assert session_id("alice", {"instructions": "You review code.", "input": later_turn}) == first
    assert session_id("alice", {"instructions": "You write code.", "input": CHAT[1:]}) != first
    assert session_id("alice", {"input": "Is this safe?"}) != session_id("alice", {"input": "Is that safe?"})


def test_the_id_holds_neither_key_nor_text():
    secret_prompt = "the launch code is 0000"
    value = session_id(ALICE_KEY, {"messages": [{"role": "user", "content": secret_prompt}]})
    assert len(value) == 32 and int(value, 16) >= 0  # hex digits only
    assert ALICE_KEY not in value and "0000" not in value


def test_odd_bodies_still_get_an_id():
    assert session_id(None, {}) == session_id(None, {"prompt": None})
    assert len(session_id("alice", {"messages": [{"role": "system", "content": "Only a system prompt."}, "odd"]})) == 32
    assert len(session_id("alice", {"messages": [{"role": "user", "content": "\ud800 lone surrogate"}]})) == 32


def _generations_sent(make_app, fake_vllm, **env):
    client = make_app(**env).test_client()
    for key in (ALICE_KEY, ALICE_KEY, BOB_KEY):
        r = client.post(f"/k/{key}/api/dce/proxy", json=DCE_EXTENSION_BODY)
        assert r.status_code == 200
        r.get_data()
    assert client.post("/v1/chat/completions", json={"messages": CHAT}, headers=bearer(ALICE_KEY)).status_code == 200
    return [request.headers.get(SESSION_HEADER) for request in fake_vllm.generation_requests]


def test_the_router_gets_the_id_with_every_generation(make_app, fake_vllm):
    alice, alice_again, bob, alice_chat = _generations_sent(make_app, fake_vllm, DCE_SESSION_AFFINITY="true")
    assert alice and alice == alice_again and bob != alice and alice_chat not in (alice, bob)


def test_a_single_vllm_gets_no_id(make_app, fake_vllm):
    assert _generations_sent(make_app, fake_vllm) == [None] * 4
