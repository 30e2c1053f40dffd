"""The training sampler (aspect-ratio groups, exact mid-epoch restart, sharding over ranks) and
the CPU allocator setting."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from hcral.runner import ResumableSampler, aspect_groups
from hcral.data import SyntheticShapes


def batches(sampler: ResumableSampler, batch_size: int) -> list[list[int]]:
    order = list(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_every_batch_is_one_group_and_every_sample_is_seen(batch_size: int) -> None:
    groups = [0] * 13 + [1] * 6  # 13 landscape, 6 portrait
    sampler = ResumableSampler(len(groups), shuffle=True, seed=3, groups=groups, batch_size=batch_size)
    got = batches(sampler, batch_size)
    assert all(len(b) == batch_size for b in got)  # groups are padded to whole batches
    assert all(len({groups[i] for i in b}) == 1 for b in got)
    assert set(sum(got, [])) == set(range(len(groups)))
    expected = batch_size * (math.ceil(13 / batch_size) + math.ceil(6 / batch_size))
    assert len(sampler) == expected
    # Padding repeats each group's own samples at most once more than the others.
    counts = Counter(sum(got, []))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_groups_order_is_a_function_of_seed_and_epoch_and_restarts_exactly() -> None:
    groups = [i % 3 == 0 for i in range(40)]
    a = ResumableSampler(40, shuffle=True, seed=1, groups=groups, batch_size=4)
    b = ResumableSampler(40, shuffle=True, seed=1, groups=groups, batch_size=4)
    a.set_epoch(2)
    b.set_epoch(2, start=12)
    assert list(a)[12:] == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_draws_whole_single_group_batches(world: int) -> None:
    groups = [0] * 11 + [1] * 7
    per_rank = []
    for rank in range(world):
        s = ResumableSampler(len(groups), shuffle=True, seed=0, groups=groups, batch_size=2)
        s.rank, s.world = rank, world
        per_rank.append(batches(s, 2))
    assert len({len(r) for r in per_rank}) == 1
    for step in zip(*per_rank):  # one step: every rank's batch comes from the same group
        assert len({groups[i] for b in step for i in b}) == 1
    assert set(i for r in per_rank for b in r for i in b) == set(range(len(groups)))


def test_a_single_group_is_the_order_without_groups() -> None:
    plain = ResumableSampler(20, shuffle=True, seed=4)
    grouped = ResumableSampler(20, shuffle=True, seed=4, groups=[0] * 20, batch_size=8)
    plain.set_epoch(1)
    grouped.set_epoch(1)
    assert list(grouped) == list(plain)


def test_groups_are_checked() -> None:
    with pytest.raises(ValueError, match="one id per sample"):
        ResumableSampler(3, shuffle=True, groups=[0, 1])
    with pytest.raises(ValueError, match="shuffle=True"):
        ResumableSampler(2, shuffle=False, groups=[0, 1])


def test_aspect_groups_reads_sizes_without_rendering() -> None:
    portrait = SyntheticShapes(3, image_size=(64, 32))
    landscape = SyntheticShapes(3, image_size=(32, 64))
    square = SyntheticShapes(2, image_size=(32, 32))
    assert aspect_groups(portrait) == [1, 1, 1]
    assert aspect_groups(landscape) == [0, 0, 0] and aspect_groups(square) == [0, 0]
    assert not portrait._records  # nothing was rendered


def test_keep_freed_memory_is_taken_by_glibc_and_harmless_elsewhere() -> None:
    import ctypes
    import sys

    from hcral.utils import keep_freed_memory

    try:
        ctypes.CDLL("libc.so.6").mallopt
        glibc = sys.platform.startswith("linux")
    except (OSError, AttributeError):
        glibc = False
    assert keep_freed_memory() is glibc
