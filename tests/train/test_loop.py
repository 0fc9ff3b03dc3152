"""The pretraining data order: every index once per epoch across ranks, whole batches, resumable."""

from __future__ import annotations

from dinokit.train.loop import EpochSampler, EpochTally, numbered_checkpoint


def orders(n: int, world: int, batch: int, epoch: int, start: int = 0) -> list[list[int]]:
    out = []
    for rank in range(world):
        sampler = EpochSampler(range(n), world, rank, seed=0, batch_size=batch)
        sampler.set_epoch(epoch, start)
        out.append(list(sampler))
    return out


def test_every_index_once_per_epoch_across_ranks():
    # 12 images, 2 ranks, batch 3: 6 per rank = 2 whole batches each, nothing dropped
    ranks = orders(12, world=2, batch=3, epoch=0)
    assert [len(r) for r in ranks] == [6, 6]
    assert sorted(ranks[0] + ranks[1]) == list(range(12))


def test_only_whole_batches_and_no_repeats():
    # 10 images, 2 ranks, batch 2: 5 per rank, cut to 2 batches = 4 each; 8 distinct images per epoch
    ranks = orders(10, world=2, batch=2, epoch=0)
    assert [len(r) for r in ranks] == [4, 4]
    seen = ranks[0] + ranks[1]
    assert len(set(seen)) == 8 and set(seen) <= set(range(10))
    sampler = EpochSampler(range(10), 2, 0, seed=0, batch_size=2)
    assert (sampler.iters, len(sampler)) == (2, 4)


def test_a_new_order_each_epoch_the_same_for_the_same_epoch():
    assert orders(12, 1, 4, epoch=0) == orders(12, 1, 4, epoch=0)
    assert orders(12, 1, 4, epoch=0) != orders(12, 1, 4, epoch=1)
    assert sorted(orders(12, 1, 4, epoch=1)[0]) == list(range(12))


def test_resume_at_a_start_iteration_skips_the_done_batches():
    full = orders(12, world=2, batch=3, epoch=5)
    resumed = orders(12, world=2, batch=3, epoch=5, start=1)
    assert resumed == [r[3:] for r in full]  # one batch of 3 done on each rank
    sampler = EpochSampler(range(12), 2, 1, seed=0, batch_size=3)
    sampler.set_epoch(5, 1)
    assert len(sampler) == 3
    sampler.set_epoch(6)  # the next epoch starts from its first batch again
    assert len(sampler) == 6


def test_epoch_tally_round_trips_the_checkpoint_record():
    tally = EpochTally(seconds=1.5, images=16, skipped=1, losses=[5.0, 4.5])
    record = tally.to_dict()
    assert record == {"seconds": 1.5, "images": 16, "skipped": 1, "losses": [5.0, 4.5]}
    assert EpochTally.from_dict(record) == tally
    assert EpochTally.from_dict(None) == EpochTally()


def test_numbered_checkpoint_cadence(tmp_path):
    assert numbered_checkpoint(tmp_path, 20, 20) == tmp_path / "checkpoint0020.pth"
    assert numbered_checkpoint(tmp_path, 3, 1) == tmp_path / "checkpoint0003.pth"
    assert numbered_checkpoint(tmp_path, 19, 20) is None
    assert numbered_checkpoint(tmp_path, 20, 0) is None
