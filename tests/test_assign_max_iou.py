"""Max-IoU assignment for RetinaNet (MMDetection's MaxIoUAssigner semantics): threshold bands,
low-quality matches, a slow loop-based reference, batching and chunking."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

import hcral.assign.max_iou as max_iou_mod
from hcral.assign import BACKGROUND, IGNORED, max_iou_assign, max_iou_assign_batched
from hcral.ops.boxes import box_iou

_spec = importlib.util.spec_from_file_location("_atss_tests", Path(__file__).with_name("test_assign_atss.py"))
_atss_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_atss_tests)
grid_layout, random_gts, padded = _atss_tests.grid_layout, _atss_tests.random_gts, _atss_tests._padded


def reference_max_iou(priors, gts, *, pos_iou=0.5, neg_iou=0.4, min_pos_iou=0.0, low_quality=True, assign_all=True):
    """MaxIoUAssigner's steps as loops; thresholds compared in the IoU's dtype, as torch does."""
    n, m = priors.shape[0], gts.shape[0]
    if n == 0 or m == 0:
        return [BACKGROUND] * n
    iou = box_iou(priors, gts)  # (N, M)
    out = [IGNORED] * n  # 1. everything ignored
    for i in range(n):
        best = 0
        for j in range(1, m):
            if iou[i, j] > iou[i, best]:  # equal IoU: the lower GT index
                best = j
        top = iou[i, best]
        if top >= 0 and top < neg_iou:  # 2. negatives
            out[i] = BACKGROUND
        if top >= pos_iou:  # 3. positives
            out[i] = best
    if low_quality:  # 4. each GT's best prior(s), later GTs overwriting earlier ones
        for j in range(m):
            gt_max = iou[:, j].max()
            if gt_max >= min_pos_iou:
                hits = (iou[:, j] == gt_max).nonzero().squeeze(1).tolist()
                for i in hits if assign_all else hits[:1]:
                    out[i] = j
    return out


def _one_gt(priors, **kw):
    return max_iou_assign(torch.tensor(priors, dtype=torch.float32), torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
                          torch.tensor([4]), **kw)


def test_threshold_bands():
    # IoU with GT [0, 0, 10, 10]: 0.5 (pos, >=), 0.4 (ignored: neg needs < 0.4), 1/3 (neg),
    # 100/190 (pos), 0 (neg). The GT's best prior (100/190) is already positive.
    a = _one_gt([[0, 0, 10, 20], [0, 0, 10, 25], [0, 0, 10, 30], [0, 0, 10, 19], [100, 100, 110, 110]])
    assert a.gt_index.tolist() == [0, IGNORED, BACKGROUND, 0, BACKGROUND]
    assert a.labels.tolist() == [4, -1, -1, 4, -1]
    assert torch.allclose(a.max_iou, torch.tensor([0.5, 0.4, 1 / 3, 100 / 190, 0.0]))
    assert a.pos_mask.sum() == 2 and a.ignore_mask.sum() == 1 and a.neg_mask.sum() == 2 and not a.expanded.any()
    # Custom thresholds move the bands.
    b = _one_gt([[0, 0, 10, 20], [0, 0, 10, 25], [0, 0, 10, 30]], pos_iou=0.6, neg_iou=0.3, low_quality_matches=False)
    assert b.gt_index.tolist() == [IGNORED, IGNORED, IGNORED]


def test_low_quality_matches():
    # Best IoU of the GT is 0.25, reached by two priors; 25/175 for the third.
    priors = [[0, 0, 10, 40], [0, 0, 40, 10], [5, 5, 15, 15]]
    assert _one_gt(priors).gt_index.tolist() == [0, 0, BACKGROUND]  # every prior at the max
    assert _one_gt(priors, gt_max_assign_all=False).gt_index.tolist() == [0, BACKGROUND, BACKGROUND]
    assert _one_gt(priors, min_pos_iou=0.3).gt_index.tolist() == [BACKGROUND] * 3
    assert _one_gt(priors, low_quality_matches=False).gt_index.tolist() == [BACKGROUND] * 3
    lq = _one_gt(priors)
    assert torch.allclose(lq.max_iou, torch.tensor([0.25, 0.25, 25 / 175]))


def test_low_quality_conflict_goes_to_the_later_gt():
    # One prior is the best of both GTs: MMDetection's loop leaves it with the later GT, even
    # though GT 0 overlaps it more (0.275 vs 0.25).
    priors = torch.tensor([[0.0, 0.0, 10.0, 40.0], [50.0, 50.0, 60.0, 60.0]])
    gts = torch.tensor([[0.0, 0.0, 10.0, 11.0], [0.0, 0.0, 10.0, 10.0]])
    a = max_iou_assign(priors, gts, torch.tensor([1, 2]))
    assert a.gt_index.tolist() == [1, BACKGROUND] and a.labels.tolist() == [2, -1]
    assert a.max_iou[0].item() == pytest.approx(0.25)  # the IoU with the GT it was given


def test_equal_iou_goes_to_the_lower_gt_and_zero_overlap_quirk():
    priors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]])
    twins = torch.tensor([[0.0, 0.0, 10.0, 12.0], [0.0, 0.0, 10.0, 12.0]])
    # IoU 100/120 with both: positive for GT 0 by max; then the low-quality pass of GT 1 (same
    # maximum) overwrites it, as MMDetection does.
    assert max_iou_assign(priors, twins, torch.tensor([0, 1])).gt_index.tolist() == [1, BACKGROUND]
    assert max_iou_assign(priors, twins, torch.tensor([0, 1]), low_quality_matches=False).gt_index.tolist() == [0, -1]
    # As in MMDetection with min_pos_iou = 0: a GT that overlaps no prior takes every prior it does
    # not overlap (documented; degenerate GTs must be filtered upstream).
    far = torch.tensor([[100.0, 100.0, 110.0, 110.0]])
    assert max_iou_assign(priors, far, torch.tensor([0])).gt_index.tolist() == [0, 0]
    assert max_iou_assign(priors, far, torch.tensor([0]), min_pos_iou=1e-6).gt_index.tolist() == [-1, -1]


def test_empty_inputs_and_errors():
    priors, _ = grid_layout(32, 32, [8])
    e = max_iou_assign(priors, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert e.gt_index.eq(BACKGROUND).all() and e.max_iou.eq(0).all() and e.labels.eq(-1).all()
    assert max_iou_assign(torch.zeros(0, 4), torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([0])).gt_index.shape == (0,)
    with pytest.raises(ValueError, match="gt_boxes"):
        max_iou_assign(priors, torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="gt_labels"):
        max_iou_assign(priors, torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_pairs"):
        max_iou_assign(priors, torch.ones(2, 4), torch.zeros(2, dtype=torch.long), max_pairs=0)


@pytest.mark.parametrize("options", [{}, {"gt_max_assign_all": False}, {"min_pos_iou": 0.2},
                                     {"low_quality_matches": False}, {"pos_iou": 0.6, "neg_iou": 0.3}])
def test_matches_reference_on_random_scenes(options):
    ref_options = {
        "pos_iou": options.get("pos_iou", 0.5), "neg_iou": options.get("neg_iou", 0.4),
        "min_pos_iou": options.get("min_pos_iou", 0.0), "low_quality": options.get("low_quality_matches", True),
        "assign_all": options.get("gt_max_assign_all", True),
    }
    for seed in range(25):
        rng = random.Random(seed)
        # RetinaNet-like: 3 scales x 3 ratios per location, two levels; snapped GTs give equal IoUs.
        priors, _ = grid_layout(48, 48, [8, 16], sides=(2.0, 3.0, 4.0), offset=rng.choice([0.0, 0.5]))
        gts = random_gts(rng, rng.choice([1, 3, rng.randrange(0, 30)]), 48, 48, snap=rng.choice([None, 4]))
        labels = torch.arange(gts.shape[0]) % 3
        a = max_iou_assign(priors, gts, labels, **options)
        assert a.gt_index.tolist() == reference_max_iou(priors, gts, **ref_options), seed
        if gts.shape[0]:
            iou = box_iou(priors, gts)
            pos = a.pos_mask
            assert torch.equal(a.max_iou[pos], iou[pos, a.gt_index[pos]])
            assert torch.equal(a.max_iou[~pos], iou[~pos].amax(1))


def test_batched_equals_per_image_and_chunking(monkeypatch):
    rng = random.Random(3)
    priors, _ = grid_layout(64, 64, [8, 16, 32], sides=(4.0, 5.0, 6.0))
    gt_list = [random_gts(rng, m, 64, 64, snap=rng.choice([None, 4])) for m in (2, 0, 30, 1, 9)]
    label_list = [torch.arange(g.shape[0]) % 5 for g in gt_list]
    boxes, labels, mask = padded(gt_list, label_list)
    batched = max_iou_assign_batched(priors, boxes, labels, mask)
    singles = [max_iou_assign(priors, g, lab) for g, lab in zip(gt_list, label_list)]
    for i, (one, single) in enumerate(zip(batched.unbind(), singles)):
        for f in ("gt_index", "labels", "max_iou", "expanded"):
            assert torch.equal(getattr(one, f), getattr(single, f)), (i, f)
    none = max_iou_assign_batched(priors, boxes, labels, torch.zeros_like(mask))
    assert none.gt_index.eq(BACKGROUND).all() and none.max_iou.eq(0).all()  # only ignored (masked) GTs
    # Chunks over GTs: every (B, c, N) IoU block within the budget, the same result.
    seen = []
    real = max_iou_mod.gt_prior_iou

    def recording(*args, **kw):
        out = real(*args, **kw)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(max_iou_mod, "gt_prior_iou", recording)
    budget = 2 * boxes.shape[0] * priors.shape[0]  # two GTs per chunk
    chunked = max_iou_assign_batched(priors, boxes, labels, mask, max_pairs=budget)
    for f in ("gt_index", "labels", "max_iou"):
        assert torch.equal(getattr(chunked, f), getattr(batched, f)), f
    assert len(seen) == 16 and max(seen) <= budget  # 31 padded GTs in chunks of 2
    # Equal IoUs in different chunks still go to the lower GT index.
    twins = torch.tensor([[0.0, 0.0, 10.0, 12.0], [30.0, 30.0, 40.0, 40.0], [0.0, 0.0, 10.0, 12.0]])
    few = torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 40.0, 40.0], [90.0, 90.0, 99.0, 99.0]])
    one_per_chunk = max_iou_assign(few, twins, torch.tensor([0, 1, 2]), low_quality_matches=False, max_pairs=3)
    assert one_per_chunk.gt_index.tolist() == [0, 1, BACKGROUND]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    for seed in range(20):
        rng = random.Random(seed)
        priors, _ = grid_layout(48, 48, [8, 16], sides=(2.0, 3.0, 4.0))
        gts = random_gts(rng, rng.randrange(0, 30), 48, 48, snap=rng.choice([None, 4]))
        labels = torch.arange(gts.shape[0]) % 3
        cpu = max_iou_assign(priors, gts, labels)
        gpu = max_iou_assign(priors.cuda(), gts.cuda(), labels.cuda())
        assert torch.equal(gpu.gt_index.cpu(), cpu.gt_index) and torch.equal(gpu.max_iou.cpu(), cpu.max_iou)
