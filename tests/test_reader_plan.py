"""Epoch plans (pure functions): every selected sample exactly once, equal batch counts per rank."""
from __future__ import annotations

import numpy as np
import pytest

from cxrshards import plan


def test_batch_sizes_fill_full_batches_first():
    assert plan.batch_sizes(7, 2, 4).tolist() == [4, 3]
    assert plan.batch_sizes(8, 2, 4).tolist() == [4, 4]
    assert plan.batch_sizes(4, 2, 4).tolist() == [3, 1]  # never an empty batch when n >= k
    assert plan.batch_sizes(9, 3, 4).tolist() == [4, 4, 1]
    assert plan.batch_sizes(1, 2, 1).tolist() == [1, 0]  # impossible to fill: documented empty batch
    assert plan.batch_sizes(0, 0, 4).tolist() == []
    with pytest.raises(ValueError):
        plan.batch_sizes(9, 2, 4)


@pytest.mark.parametrize("contiguous", [True, False])
def test_every_sample_once_equal_batches_for_many_shapes(contiguous):
    for n in range(0, 31):
        order = np.random.default_rng(n).permutation(n)
        for world in (1, 2, 3, 4):
            for batch in (None, 1, 2, 3, 5):
                seen, lengths = [], []
                for rank in range(world):
                    rp = plan.rank_plan(order, rank, world, batch, contiguous_workers=contiguous)
                    lengths.append(len(rp))
                    if batch is not None:
                        sizes = rp.sizes.tolist()
                        assert sum(sizes) == len(rp.rows) and all(0 <= s <= batch for s in sizes)
                        assert sizes == sorted(sizes, reverse=True)
                        feasible = n >= world and (batch >= 2 or n % world == 0)
                        assert (min(sizes, default=1) >= 1) or not feasible, (n, world, batch, sizes)
                    for workers in (1, 2, 3):
                        parts = [rp.worker(w, workers) for w in range(workers)]
                        assert sorted(np.concatenate([p.rows for p in parts]).tolist()) == sorted(rp.rows.tolist())
                        if batch is not None:
                            assert sum(len(p.sizes) for p in parts) == len(rp.sizes)
                            assert all(p.sizes.sum() == len(p.rows) for p in parts)
                    seen += rp.rows.tolist()
                assert sorted(seen) == list(range(n))
                if batch is None:
                    assert max(lengths) - min(lengths) <= (1 if n else 0)
                else:
                    assert len(set(lengths)) == 1 and lengths[0] == plan.batches_per_rank(n, world, batch)


def test_round_robin_workers_replay_the_rank_order():
    rp = plan.rank_plan(np.arange(20), 0, 1, 3, contiguous_workers=False)
    parts = [rp.worker(w, 3) for w in range(3)]
    batches = {w: np.split(p.rows, np.cumsum(p.sizes)[:-1]) for w, p in enumerate(parts)}
    interleaved = [batches[u % 3][u // 3].tolist() for u in range(len(rp))]
    assert interleaved == [list(range(i, min(i + 3, 20))) for i in range(0, 20, 3)]


def test_orders_are_pure_and_keep_tar_order_within_a_shard():
    codes = np.repeat(np.arange(4), 3)
    a = plan.wds_order(codes, 4, seed=0, epoch=1, shuffle=True)
    assert a.tolist() == plan.wds_order(codes, 4, seed=0, epoch=1, shuffle=True).tolist()
    blocks = a.reshape(4, 3)
    assert all(b.tolist() == list(range(b[0], b[0] + 3)) for b in blocks)  # whole shards, in tar order
    assert plan.wds_order(codes, 4, 0, 0, shuffle=False).tolist() == list(range(12))
    assert plan.h5_order(10, 0, 0, True).tolist() != plan.h5_order(10, 0, 1, True).tolist()
    state = np.random.get_state()
    plan.h5_order(10, 3, 3, True)
    assert np.array_equal(state[1], np.random.get_state()[1])
