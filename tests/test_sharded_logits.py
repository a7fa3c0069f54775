"""rlfuse.ShardedLogits (issue 16): logits split over the vocabulary across torch.distributed ranks.

Real processes: one gloo group of 2 ranks and one of 3 (uneven shards, V not divisible by the world
size, a one-column shard, shards out of rank order), each running every case of
tests/_sharded_worker.py in turn and comparing with the unsharded op on the full logits: values,
gradient slices, sparse top-k ids, sampled tokens for the same seed, and bad input raising the same
error on every rank (the group has a timeout, and so does each group run here: nothing hangs).
"""

from __future__ import annotations

import pytest

import _sharded_worker as worker

WORLD_SIZES = (2, 3)
GROUP_DEADLINE_S = 240


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{world: {rank: {case: outcome}}}: each world size's group runs once for the whole module."""
    results = {}
    for world in WORLD_SIZES:
        directory = tmp_path_factory.mktemp(f"sharded_world{world}")
        results[world] = worker.run_group(world, list(worker.CASES), str(directory), GROUP_DEADLINE_S)
    return results


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", list(worker.CASES))
def test_sharded_case(outcomes, world, name):
    failures = []
    for rank, cases in sorted(outcomes[world].items()):
        outcome = cases.get(name, {"ok": False, "error": "no result (the rank died before this case)"})
        if not outcome["ok"]:
            failures.append(f"--- rank {rank} of {world} ---\n{outcome['error']}")
    assert not failures, "\n".join(failures)
