"""ATSS (formulation §5): hand-built cases, a slow loop-based reference written straight from §5
(random scenes and the raccoon boxes with a real prior layout), batching, chunking, edge cases."""

from __future__ import annotations

import math
import os
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import hcral.assign.atss as atss_mod
from hcral.assign import BACKGROUND, IGNORED, Assignment, atss_assign, atss_assign_batched
from hcral.assign.utils import DEFAULT_MAX_PAIRS_CPU, k_nearest
from hcral.ops.boxes import box_iou

RACCOON = Path(
    os.environ.get("HCRAL_RACCOON", Path(__file__).resolve().parents[2] / "shared/datasets/raccoon")
)
needs_raccoon = pytest.mark.skipif(not RACCOON.is_dir(), reason=f"raccoon dataset not at {RACCOON}")


# ---------------------------------------------------------------------------------------------
# The slow reference: §5 read line by line, loops over GTs, levels and priors.
# ---------------------------------------------------------------------------------------------


def reference_atss(priors, level_sizes, gt_boxes, *, topk=9, margin=0.01):
    """Returns (gt_index list, thr list). Distances and IoUs are the same numbers the
    implementation uses (same dtype, same formulas), so this checks the selection logic exactly."""
    n, m = priors.shape[0], gt_boxes.shape[0]
    gt_index = [BACKGROUND] * n
    if n == 0 or m == 0:  # step 2
        return gt_index, []
    iou = box_iou(priors, gt_boxes)  # step 1 (N, M)
    pcx, pcy = (priors[:, 0] + priors[:, 2]) / 2, (priors[:, 1] + priors[:, 3]) / 2
    gcx, gcy = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
    thrs, wants = [], [[] for _ in range(n)]
    for j in range(m):
        d2 = ((pcx - gcx[j]) * (pcx - gcx[j]) + (pcy - gcy[j]) * (pcy - gcy[j])).tolist()
        candidates, start = [], 0
        for size in level_sizes:  # step 3: per level, smallest distance, then lower index
            ranked = sorted((d2[i], i) for i in range(start, start + size))
            candidates += [i for _, i in ranked[: min(topk, size)]]
            start += size
        vals = [float(iou[i, j]) for i in candidates]
        mean = math.fsum(vals) / len(vals)  # step 4
        std = 0.0 if len(vals) == 1 else math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        thr = mean + std
        thrs.append(thr)
        x1, y1, x2, y2 = gt_boxes[j].tolist()
        for i, v in zip(candidates, vals):  # step 5
            cx, cy = float(pcx[i]), float(pcy[i])
            inside = min(cx - x1, cy - y1, x2 - cx, y2 - cy) > margin
            if v >= thr and inside:
                wants[i].append(j)
    for i in range(n):  # step 6: highest IoU, equal -> lower GT index
        best = None
        for j in wants[i]:
            if best is None or float(iou[i, j]) > float(iou[i, best]):
                best = j
        if best is not None:
            gt_index[i] = best
    return gt_index, thrs


def grid_layout(height, width, strides, *, sides=(8.0,), offset=0.0, dtype=torch.float32):
    """Square/rectangular anchors on a grid per level: centres ((x+offset)·s, (y+offset)·s),
    one anchor per entry of ``sides`` (side = entry · s), level-major, (y, x, anchor) order."""
    boxes, sizes = [], []
    for s in strides:
        h, w = math.ceil(height / s), math.ceil(width / s)
        ys, xs = torch.meshgrid(
            (torch.arange(h, dtype=torch.float64) + offset) * s,
            (torch.arange(w, dtype=torch.float64) + offset) * s,
            indexing="ij",
        )
        c = torch.stack((xs.reshape(-1), ys.reshape(-1)), -1)
        level = []
        for side in sides:
            half = side * s / 2
            level.append(torch.cat((c - half, c + half), -1))
        level = torch.stack(level, 1).reshape(-1, 4)
        boxes.append(level)
        sizes.append(level.shape[0])
    return torch.cat(boxes).to(dtype), sizes


def random_gts(rng, m, height, width, *, snap=None, dtype=torch.float32):
    """m boxes inside (height, width); with ``snap``, centres and sizes on a grid of that step
    (GT centres on prior centres or midway: many equidistant priors)."""
    out = []
    for _ in range(m):
        if snap:
            cx, cy = rng.randrange(0, width + 1, snap) / 1.0, rng.randrange(0, height + 1, snap) / 1.0
            w, h = rng.randrange(snap, 12 * snap, snap), rng.randrange(snap, 12 * snap, snap)
        else:
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            w, h = rng.uniform(1, width), rng.uniform(1, height)
        out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return torch.tensor(out, dtype=dtype).reshape(-1, 4)


def assert_same(a: Assignment, gt_index) -> None:
    assert a.gt_index.tolist() == list(gt_index)


# ---------------------------------------------------------------------------------------------
# Hand-built cases
# ---------------------------------------------------------------------------------------------


def test_classic_four_priors_two_gts():
    priors = torch.tensor([[0, 0, 10, 10], [10, 10, 20, 20], [5, 5, 15, 15], [32, 32, 38, 42]], dtype=torch.float32)
    gts = torch.tensor([[0, 0, 10, 9], [0, 10, 10, 19]], dtype=torch.float32)
    # One level, topk=9 > 4: every prior is a candidate of both GTs.
    # GT 0: IoUs (0.9, 0, 20/170, 0) -> thr = mean + std = 0.254 + 0.434 = 0.688: prior 0 passes,
    #   and its centre (5, 5) is 5, 5, 5, 4 px inside GT 0.
    # GT 1: IoUs (0, 0, 25/165, 0) -> thr = 0.038 + 0.076 = 0.114: only prior 2 passes the IoU test,
    #   but its centre (10, 10) lies on GT 1's top and right edges (distance 0 <= 0.01): rejected.
    a = atss_assign(priors, [4], gts, torch.tensor([2, 3]))
    assert_same(a, [0, -1, -1, -1])
    assert a.labels.tolist() == [2, -1, -1, -1]
    assert a.max_iou[0].item() == pytest.approx(0.9) and a.max_iou[1:].eq(0).all()
    assert not a.expanded.any() and a.num_pos == 1
    assert reference_atss(priors, [4], gts)[0] == [0, -1, -1, -1]


def _four_around(gt):
    # Four 10x10 priors around (10, 10); all equidistant from the centre of a GT centred there.
    priors = torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]], dtype=torch.float32)
    return priors, torch.tensor([gt], dtype=torch.float32)


def test_threshold_is_greater_or_equal():
    # GT [4, 4, 16, 16]: the four priors have the same IoU 36/208, so std = 0 and thr = that IoU:
    # ">=" makes all four positive, ">" would make none. (Centres are 1 px inside the GT.)
    priors, gts = _four_around([4, 4, 16, 16])
    a = atss_assign(priors, [4], gts, torch.tensor([0]))
    assert_same(a, [0, 0, 0, 0])
    assert torch.allclose(a.max_iou, torch.full((4,), 36 / 208))
    # A single candidate: std is 0 (not NaN), thr is its own IoU, so it is positive.
    one = atss_assign(priors[:1], [1], torch.tensor([[2.0, 2.0, 9.0, 9.0]]), torch.tensor([0]))
    assert_same(one, [0])


def test_center_margin_is_strict_and_0_01():
    # A single prior, so thr = its IoU and only the centre rule decides; GT [0, 0, 20, 20].
    gts = torch.tensor([[0.0, 0.0, 20.0, 20.0]], dtype=torch.float64)
    labels = torch.tensor([0])

    def prior_at(cx):
        return torch.tensor([[cx - 10, 0.0, cx + 10, 20.0]], dtype=torch.float64)

    assert_same(atss_assign(prior_at(0.005), [1], gts, labels), [-1])  # inside by 0.005 <= 0.01
    assert_same(atss_assign(prior_at(0.015), [1], gts, labels), [0])  # inside by 0.015 > 0.01
    assert_same(atss_assign(prior_at(0.0), [1], gts, labels), [-1])  # on the edge
    # Strictness, with a margin that floats represent exactly: distance == margin is rejected.
    assert_same(atss_assign(prior_at(0.5), [1], gts, labels, center_margin=0.5), [-1])
    assert_same(atss_assign(prior_at(0.75), [1], gts, labels, center_margin=0.5), [0])


def test_equal_distances_go_to_the_lower_prior_index():
    # A row of 10x10 priors with centres x = 5, 15, 25, ...; a GT centred at x = 20 is equidistant
    # from priors 1 and 2. With topk = 1 the candidate must be the lower index.
    priors = torch.tensor([[10.0 * i, 0, 10.0 * i + 10, 10] for i in range(5)])
    gts = torch.tensor([[12.0, 0.0, 28.0, 10.0]])
    assert_same(atss_assign(priors, [5], gts, torch.tensor([0]), topk=1), [-1, 0, -1, -1, -1])
    # Reversed order: the same boxes, now the other one has the lower index.
    rev = priors.flip(0)
    assert_same(atss_assign(rev, [5], gts, torch.tensor([0]), topk=1), [-1, -1, 0, -1, -1])
    # topk = 3 takes both tied priors and the lower index among the next tie (x = 5 vs 35).
    got = atss_assign(priors, [5], gts, torch.tensor([0]), topk=3)
    assert got.gt_index.tolist() == reference_atss(priors, [5], gts, topk=3)[0]


def test_k_nearest_is_exact_under_heavy_ties():
    gen = torch.Generator().manual_seed(0)
    for n, k in [(7, 3), (50, 9), (200, 9), (30, 30), (40, 1)]:
        dist = torch.randint(0, 4, (25, n), generator=gen).float()  # many equal values
        got = k_nearest(dist, k)
        for row, idx in zip(dist.tolist(), got.tolist()):
            want = sorted(i for _, i in sorted((v, i) for i, v in enumerate(row))[:k])
            assert idx == want


def test_conflicts_highest_iou_then_lower_gt_index():
    priors, _ = _four_around([0, 0, 1, 1])
    # Both GTs cover prior 0 (centre (5, 5)); GT 1 fits it better: it goes to GT 1.
    gts = torch.tensor([[1.0, 1.0, 12.0, 12.0], [0.0, 0.0, 10.5, 10.5]])
    a = atss_assign(priors, [4], gts, torch.tensor([0, 1]))
    ref, _ = reference_atss(priors, [4], gts)
    assert a.gt_index[0].item() == 1 and a.gt_index.tolist() == ref and a.labels[0].item() == 1
    # Two identical GTs: equal IoU everywhere, so every positive goes to the lower index.
    twin = torch.tensor([[4.0, 4.0, 16.0, 16.0], [4.0, 4.0, 16.0, 16.0]])
    b = atss_assign(priors, [4], twin, torch.tensor([3, 5]))
    assert_same(b, [0, 0, 0, 0])
    assert b.labels.tolist() == [3, 3, 3, 3]


def test_topk_capped_by_level_size_and_empty_levels():
    priors, sizes = grid_layout(32, 32, [4, 8, 16, 32])
    # Levels of 64, 16, 4, 1 priors and an empty one: candidates 9 + 9 + 4 + 1.
    sizes = sizes[:2] + [0] + sizes[2:]
    gts = torch.tensor([[3.0, 5.0, 20.0, 27.0], [10.0, 10.0, 31.0, 18.0]])
    a = atss_assign(priors, sizes, gts, torch.tensor([0, 1]))
    ref, thrs = reference_atss(priors, sizes, gts)
    assert a.gt_index.tolist() == ref and a.num_pos > 0


# ---------------------------------------------------------------------------------------------
# Edge cases and input checks
# ---------------------------------------------------------------------------------------------


def test_no_gt_no_priors_all_background():
    priors, sizes = grid_layout(32, 32, [8, 16])
    empty = atss_assign(priors, sizes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert empty.gt_index.eq(BACKGROUND).all() and empty.labels.eq(-1).all() and empty.max_iou.eq(0).all()
    assert empty.gt_index.shape == (priors.shape[0],) and empty.gt_index.dtype == torch.long
    none = atss_assign(torch.zeros(0, 4), [0, 0], torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([1]))
    assert none.gt_index.shape == (0,) and none.num_pos == 0
    # Only ignore regions and no GT: all background (§5 step 2, as MMDetection).
    only_ignored = atss_assign(priors, sizes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                               ignore_boxes=torch.tensor([[0.0, 0, 32, 32]]))
    assert only_ignored.gt_index.eq(BACKGROUND).all()


def test_ignore_boxes():
    priors, sizes = grid_layout(64, 64, [8], sides=(2.0,))  # 16x16 priors on a stride-8 grid
    gts = torch.tensor([[4.0, 4.0, 28.0, 28.0]])
    base = atss_assign(priors, sizes, gts, torch.tensor([0]))
    ign = torch.tensor([[30.0, 30.0, 64.0, 64.0], [0.0, 0.0, 20.0, 20.0]])
    a = atss_assign(priors, sizes, gts, torch.tensor([0]), ignore_boxes=ign)
    assert torch.equal(a.pos_mask, base.pos_mask)  # positives unchanged, even inside an ignore box
    area = (priors[:, 2] - priors[:, 0]) * (priors[:, 3] - priors[:, 1])
    iw = (torch.minimum(priors[:, None, 2], ign[:, 2]) - torch.maximum(priors[:, None, 0], ign[:, 0])).clamp(min=0)
    ih = (torch.minimum(priors[:, None, 3], ign[:, 3]) - torch.maximum(priors[:, None, 1], ign[:, 1])).clamp(min=0)
    iof = (iw * ih / area[:, None]).amax(1)
    want = torch.where(base.pos_mask, base.gt_index, torch.where(iof > 0.5, IGNORED, BACKGROUND))
    assert torch.equal(a.gt_index, want) and a.ignore_mask.sum() > 0
    # IoF exactly 0.5 is not ignored (strict >): prior [16,16,32,32] vs ignore box [24, 0, 64, 64].
    half = atss_assign(priors, sizes, gts, torch.tensor([0]), ignore_boxes=torch.tensor([[24.0, 0, 64, 64]]))
    i = ((priors == torch.tensor([16.0, 16, 32, 32])).all(1)).nonzero().item()
    assert half.gt_index[i].item() != IGNORED
    # Disabled by a non-positive threshold (MMDetection's -1 default).
    assert torch.equal(atss_assign(priors, sizes, gts, torch.tensor([0]), ignore_boxes=ign, ignore_iof_thr=-1).gt_index,
                       base.gt_index)


def test_input_errors():
    priors, sizes = grid_layout(32, 32, [8, 16])
    gts, labels = torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([0])
    with pytest.raises(ValueError, match="num_level_priors"):
        atss_assign(priors, [sizes[0]], gts, labels)
    with pytest.raises(ValueError, match=r"priors must have shape \(N, 4\)"):
        atss_assign(priors[:, :3], sizes, gts, labels)
    with pytest.raises(ValueError, match="gt_labels"):
        atss_assign(priors, sizes, gts, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="topk"):
        atss_assign(priors, sizes, gts, labels, topk=0)
    with pytest.raises(ValueError, match="finite"):
        atss_assign(priors, sizes, torch.tensor([[0.0, 0, float("nan"), 9]]), labels)
    with pytest.raises(ValueError, match="gt_mask"):
        atss_assign_batched(priors, sizes, gts[None], labels[None], torch.ones(1, 1, dtype=torch.long))


def test_low_precision_inputs_are_upcast():
    priors, sizes = grid_layout(64, 64, [8, 16, 32], sides=(4.0,))
    gts = random_gts(random.Random(3), 6, 64, 64, snap=4)
    want = atss_assign(priors, sizes, gts, torch.arange(6))
    for dtype in (torch.float16, torch.bfloat16):
        # The test boxes are multiples of 2 below 256: exact in fp16 and bf16.
        got = atss_assign(priors.to(dtype), sizes, gts.to(dtype), torch.arange(6))
        assert torch.equal(got.gt_index, want.gt_index) and got.max_iou.dtype == torch.float32


def test_runs_under_no_grad_on_inputs_requiring_grad():
    priors, sizes = grid_layout(32, 32, [8])
    gts = torch.tensor([[2.0, 2.0, 20.0, 20.0]], requires_grad=True)
    a = atss_assign(priors, sizes, gts, torch.tensor([0]))
    assert not a.max_iou.requires_grad


# ---------------------------------------------------------------------------------------------
# Reference checks
# ---------------------------------------------------------------------------------------------


def _scene(seed):
    rng = random.Random(seed)
    num_levels = rng.choice([1, 2, 3, 4])
    strides = [4 * 2**i for i in range(num_levels)]
    height, width = rng.randrange(16, 80, 4), rng.randrange(16, 80, 4)
    sides = rng.choice([(8.0,), (4.0,), (2.0, 4.0, 6.0)])
    priors, sizes = grid_layout(height, width, strides, sides=sides, offset=rng.choice([0.0, 0.5]))
    m = rng.choice([0, 1, 2, 5, rng.randrange(0, 51)])
    gts = random_gts(rng, m, height, width, snap=rng.choice([None, 2, 4]))
    return priors, sizes, gts, rng.choice([9, 9, 3, 1, 20])


@pytest.mark.parametrize("seed_block", range(4))
def test_matches_reference_on_random_scenes(seed_block):
    for seed in range(seed_block * 30, seed_block * 30 + 30):
        priors, sizes, gts, topk = _scene(seed)
        labels = torch.arange(gts.shape[0]) % 3
        a = atss_assign(priors, sizes, gts, labels, topk=topk)
        ref, _ = reference_atss(priors, sizes, gts, topk=topk)
        assert a.gt_index.tolist() == ref, f"seed {seed}"
        pos = a.pos_mask
        assert torch.equal(a.labels[pos], labels[a.gt_index[pos]]) and a.labels[~pos].eq(-1).all()
        if pos.any():
            iou = box_iou(priors, gts)
            assert torch.equal(a.max_iou[pos], iou[pos.nonzero().squeeze(1), a.gt_index[pos]])


def _raccoon_scenes():
    """(priors, level sizes, GT boxes) per raccoon image: VOC boxes resized so the short side is
    320 (long side at most 512), ATSS anchors (one square of side 8·s per location, s = 8..128,
    centres (x·s, y·s)) over the image padded to a multiple of 32."""
    scenes = []
    for path in sorted((RACCOON / "annotations").glob("*.xml")):
        root = ET.parse(path).getroot()
        w, h = int(root.find("size/width").text), int(root.find("size/height").text)
        scale = min(320 / min(h, w), 512 / max(h, w))
        boxes = [
            [float(o.find(f"bndbox/{k}").text) * scale for k in ("xmin", "ymin", "xmax", "ymax")]
            for o in root.iter("object")
        ]
        ph, pw = math.ceil(round(h * scale) / 32) * 32, math.ceil(round(w * scale) / 32) * 32
        priors, sizes = grid_layout(ph, pw, [8, 16, 32, 64, 128], sides=(8.0,))
        scenes.append((priors, sizes, torch.tensor(boxes, dtype=torch.float32)))
    return scenes


@needs_raccoon
def test_matches_reference_on_raccoon():
    scenes = _raccoon_scenes()
    assert len(scenes) == 200
    total_pos = 0
    for priors, sizes, gts in scenes:
        a = atss_assign(priors, sizes, gts, torch.zeros(gts.shape[0], dtype=torch.long))
        ref, _ = reference_atss(priors, sizes, gts)
        assert a.gt_index.tolist() == ref
        total_pos += a.num_pos
        # every GT of this dataset gets positives (boxes are large against stride 8)
        assert set(a.gt_index[a.pos_mask].tolist()) == set(range(gts.shape[0]))
    assert total_pos > 217


def test_point_priors_layout():
    # FCOS+ATSS: points at ((x + 0.5)·s, (y + 0.5)·s) with squares of side 8·s (§5).
    from hcral.models.priors import points_to_boxes

    rng = random.Random(11)
    for _ in range(5):
        priors, sizes = grid_layout(96, 128, [8, 16, 32], sides=(8.0,), offset=0.5)
        cx, cy = (priors[:, 0] + priors[:, 2]) / 2, (priors[:, 1] + priors[:, 3]) / 2
        strides = torch.cat([torch.full((n,), float(s)) for n, s in zip(sizes, [8, 16, 32])])
        assert torch.equal(points_to_boxes(torch.stack((cx, cy), -1), strides), priors)
        gts = random_gts(rng, 8, 96, 128)
        assert atss_assign(priors, sizes, gts, torch.zeros(8, dtype=torch.long)).gt_index.tolist() == \
            reference_atss(priors, sizes, gts)[0]


# ---------------------------------------------------------------------------------------------
# Batched form, chunking, devices
# ---------------------------------------------------------------------------------------------


def _padded(gt_list, label_list, extra_pad=1):
    b, m = len(gt_list), max(g.shape[0] for g in gt_list) + extra_pad
    boxes = torch.tensor([7.0, 7.0, 27.0, 27.0]).repeat(b, m, 1)  # padding: a real-looking box the mask must hide
    labels = torch.full((b, m), 5, dtype=torch.long)
    mask = torch.zeros((b, m), dtype=torch.bool)
    for i, (g, lab) in enumerate(zip(gt_list, label_list)):
        boxes[i, : g.shape[0]] = g
        labels[i, : g.shape[0]] = lab
        mask[i, : g.shape[0]] = True
    return boxes, labels, mask


def test_batched_equals_per_image():
    rng = random.Random(5)
    priors, sizes = grid_layout(96, 96, [8, 16, 32, 64], sides=(8.0,))
    gt_list = [random_gts(rng, m, 96, 96, snap=rng.choice([None, 4])) for m in (3, 0, 17, 1, 40, 6)]
    label_list = [torch.arange(g.shape[0]) % 4 for g in gt_list]
    boxes, labels, mask = _padded(gt_list, label_list)
    batched = atss_assign_batched(priors, sizes, boxes, labels, mask)
    assert batched.gt_index.shape == (6, priors.shape[0])
    for i, one in enumerate(batched.unbind()):
        single = atss_assign(priors, sizes, gt_list[i], label_list[i])
        for field in ("gt_index", "labels", "max_iou", "expanded"):
            assert torch.equal(getattr(one, field), getattr(single, field)), (i, field)
    # An ignored (masked) GT is the same as an absent one, wherever it sits in the row.
    mask2 = mask.clone()
    mask2[2, 4] = False
    keep = torch.arange(17) != 4
    dropped = atss_assign(priors, sizes, gt_list[2][keep], label_list[2][keep])
    got = atss_assign_batched(priors, sizes, boxes, labels, mask2).unbind()[2]
    remap = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
    want = torch.where(dropped.pos_mask, remap[dropped.gt_index.clamp(min=0)], dropped.gt_index)
    assert torch.equal(got.gt_index, want)
    # All GTs masked: all background.
    assert atss_assign_batched(priors, sizes, boxes, labels, torch.zeros_like(mask)).gt_index.eq(-1).all()


def test_chunking_bounds_pairs_and_keeps_results(monkeypatch):
    rng = random.Random(9)
    priors, sizes = grid_layout(256, 256, [8, 16, 32, 64, 128], sides=(8.0,))  # N = 1365
    gts = random_gts(rng, 300, 256, 256)  # crowded: 300 GTs
    labels = torch.arange(300) % 7
    full = atss_assign(priors, sizes, gts, labels, max_pairs=1 << 30)
    seen = []
    real = atss_mod.sq_center_dist

    def recording(*args):
        out = real(*args)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(atss_mod, "sq_center_dist", recording)
    budget = 5000
    chunked = atss_assign(priors, sizes, gts, labels, max_pairs=budget)
    assert torch.equal(chunked.gt_index, full.gt_index) and torch.equal(chunked.max_iou, full.max_iou)
    assert max(seen) <= budget and len(seen) > 5 * 10  # 300 GTs in chunks of 3, 5 levels each
    # max_pairs=None picks the device's budget: 2^20 pairs on CPU.
    seen.clear()
    atss_assign(priors, sizes, gts, labels)
    assert max(seen) <= DEFAULT_MAX_PAIRS_CPU and DEFAULT_MAX_PAIRS_CPU == 1 << 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    for seed in range(40):
        priors, sizes, gts, topk = _scene(seed)
        labels = torch.arange(gts.shape[0]) % 3
        cpu = atss_assign(priors, sizes, gts, labels, topk=topk)
        gpu = atss_assign(priors.cuda(), sizes, gts.cuda(), labels.cuda(), topk=topk)
        assert gpu.gt_index.device.type == "cuda"
        assert torch.equal(gpu.gt_index.cpu(), cpu.gt_index), seed
        assert torch.equal(gpu.max_iou.cpu(), cpu.max_iou), seed
