"""The ServerApp's Grid wrapper: lost nodes are given up, node sampling has a deadline."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from fedfleet_app.server_app import FLEET_FILE, Fleet, NodesMissing, PromptGrid


class FakeGrid:
    """Speaks the part of Flower's Grid that PromptGrid uses; node 2 never replies."""

    def __init__(self, nodes: list[int], on_pull=None) -> None:
        self.nodes = nodes
        self.on_pull = on_pull or (lambda calls: None)
        self.pulls = 0
        self.sent: dict[str, int] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = [f"m{m.metadata.dst_node_id}" for m in messages]
        self.sent.update({i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True)})
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        assert self.pulls < 50, "still waiting for a node the orchestrator gave up"
        self.on_pull(self.pulls)
        return [reply(i) for i in ids if self.sent[i] != 2]


def message(node: int):
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node))


def reply(message_id: str):
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id))


def write_fleet(path: Path, lost: list[int], expected: int) -> None:
    path.write_text(json.dumps({"lost": lost, "expected": expected}))


def test_a_node_reported_lost_mid_phase_is_given_up(tmp_path: Path):
    control = tmp_path / FLEET_FILE
    write_fleet(control, [], 3)
    # The orchestrator notices node 2's VM is gone while the phase waits.
    inner = FakeGrid([1, 2, 3], on_pull=lambda n: n == 3 and write_fleet(control, [2], 3))
    events = []
    grid = PromptGrid(inner, fleet=Fleet(control, 2), min_nodes=2, emit=lambda e, **f: events.append((e, f)))
    replies = grid.send_and_receive([message(1), message(2), message(3)], timeout=600)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m3"]
    assert events == [("lost", {"nodes": [2]})]
    assert inner.pulls == 3


def test_sampling_skips_lost_nodes_and_waits_for_the_replacement(tmp_path: Path):
    control = tmp_path / FLEET_FILE
    write_fleet(control, [2], 3)
    inner = FakeGrid([1, 2, 3])
    grid = PromptGrid(inner, fleet=Fleet(control, 2), min_nodes=2, node_wait=600)
    calls = []

    def connected():
        calls.append(1)
        if len(calls) == 3:
            inner.nodes.append(4)  # the replacement SuperNode connects
        return [n for n in inner.get_node_ids() if n != 2]

    grid.connected = connected  # type: ignore[method-assign]
    assert sorted(grid.get_node_ids()) == [1, 3, 4]
    assert len(calls) == 3


def test_sampling_goes_on_with_enough_nodes_after_its_deadline(tmp_path: Path):
    control = tmp_path / FLEET_FILE
    write_fleet(control, [2], 3)  # a replacement that never comes
    events = []
    grid = PromptGrid(
        FakeGrid([1, 2, 3]), fleet=Fleet(control, 2), min_nodes=2, node_wait=0.5,
        emit=lambda e, **f: events.append((e, f)),
    )  # fmt: skip
    assert sorted(grid.get_node_ids()) == [1, 3]
    assert events == [("short", {"nodes": [1, 3], "expected": 3})]


def test_sampling_fails_with_too_few_nodes_after_its_deadline(tmp_path: Path):
    control = tmp_path / FLEET_FILE
    write_fleet(control, [2, 3], 3)
    grid = PromptGrid(FakeGrid([1, 2, 3]), fleet=Fleet(control, 2), min_nodes=2, node_wait=0.5)
    with pytest.raises(NodesMissing, match="1 SuperNodes connected, fewer than min-participants=2"):
        grid.get_node_ids()


def test_without_fleet_file_min_participants_are_expected(tmp_path: Path):
    grid = PromptGrid(FakeGrid([5, 6]), fleet=Fleet(tmp_path / "absent.json", 2), min_nodes=2)
    assert sorted(grid.get_node_ids()) == [5, 6]


def test_fedfleet_writes_the_file_the_server_app_reads():
    from fedfleet.stages.fleet import FLEET_FILE as WRITTEN

    assert WRITTEN == FLEET_FILE


def test_one_sampling_asks_twice_and_gets_one_answer(tmp_path: Path):
    control = tmp_path / FLEET_FILE
    write_fleet(control, [], 3)
    inner = FakeGrid([1, 2, 3])
    grid = PromptGrid(inner, fleet=Fleet(control, 2), min_nodes=2)
    first = list(grid.get_node_ids())
    write_fleet(control, [2], 3)  # lost between Flower's two calls of one sampling
    assert list(grid.get_node_ids()) == first == [1, 2, 3]
    # Its message is then given up at once, and the next sampling sees the loss.
    replies = grid.send_and_receive([message(1), message(2), message(3)], timeout=600)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m3"]
    write_fleet(control, [2], 2)
    assert sorted(grid.get_node_ids()) == [1, 3]


def test_messages_flower_could_not_push_get_no_wait(tmp_path: Path):
    inner = FakeGrid([1, 2])
    inner.push_messages = lambda messages: []  # as Flower does when the push is rejected
    grid = PromptGrid(inner, fleet=Fleet(tmp_path / "absent.json", 2), min_nodes=2)
    assert list(grid.send_and_receive([message(1), message(2)], timeout=600)) == []
