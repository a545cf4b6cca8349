"""``RankAgents`` (the worker's handle on its ranks' KV agents) when a rank's pipe is gone.

The rank ends of the pipes are played by the test: each answers ``open`` with a fake
agent's metadata before the handle is built.
"""
from __future__ import annotations

from multiprocessing import Pipe

import pytest
import torch

from pdserve.engine.kv_connector.rank_agents import RankAgents
from pdserve.engine.kv_transfer import KVTransferError
from pdserve.engine.kv_transfer.fake import FakeKVRegistry, FakeKVTransferAgent


def _agents(registry: FakeKVRegistry) -> tuple[RankAgents, list, bytes]:
    ours, theirs = zip(*(Pipe() for _ in range(2)))
    for rank, end in enumerate(theirs):
        kv = torch.zeros(2, 4, 2, 4, 1, 4)
        end.send(("opened", FakeKVTransferAgent(f"W-{rank}", kv, "m", registry, 2, rank, 2).metadata()))
    peer = FakeKVTransferAgent("D", torch.zeros(2, 4, 2, 4, 2, 4), "m", registry).metadata()
    return RankAgents(ours, "W-0", "m"), list(theirs), peer


def test_removing_a_peer_from_an_exited_rank_is_quiet_adding_one_is_an_error():
    agents, ranks, peer = _agents(FakeKVRegistry())
    agents.add_peer("D", peer)
    assert [end.recv()[0] for end in ranks] == ["open", "open"]
    assert [end.recv()[0] for end in ranks] == ["add_peer", "add_peer"]
    ranks[1].close()  # rank 1 exited (e.g. at the worker's stop)
    agents.remove_peer("D")  # nothing to remove on a rank that is gone: no error
    assert ranks[0].recv() == ("remove_peer", "D") and agents.peers() == frozenset()
    with pytest.raises(KVTransferError, match="rank 1 is gone"):
        agents.add_peer("D", peer)
    agents.close()
