"""FPN, anchor/point generators and box coders against closed forms and MMDetection's layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hcral.models.coders import DeltaXYWHCoder, DistancePointCoder
from hcral.models.fpn import FPN
from hcral.models.priors import ATSS_ANCHORS, AnchorGenerator, PointGenerator, points_to_boxes

STRIDES = (8, 16, 32, 64, 128)

# ---------------------------------------------------------------------------------------------
# FPN
# ---------------------------------------------------------------------------------------------


def _feats(batch=2, size=160, channels=(32, 48, 64), dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    sizes = [math.ceil(size / s) for s in (8, 16, 32)]
    return [torch.randn(batch, c, s, s, generator=g, dtype=dtype) for c, s in zip(channels, sizes)]


@pytest.mark.parametrize("extra_source", ["input", "output"])
def test_fpn_shapes(extra_source):
    fpn = FPN([32, 48, 64], 16, extra_source=extra_source)
    outs = fpn([f.float() for f in _feats()])
    assert [tuple(o.shape) for o in outs] == [(2, 16, s, s) for s in (20, 10, 5, 3, 2)]
    assert fpn.extra_convs[0].in_channels == (64 if extra_source == "input" else 16)
    assert fpn.extra_convs[1].in_channels == 16 and fpn.extra_convs[0].stride == (2, 2)


@pytest.mark.parametrize("extra_source,relu", [("input", False), ("output", False), ("output", True)])
def test_fpn_closed_form(extra_source, relu):
    # Odd sizes (9, 5, 3): upsampling must target the finer map's exact size, not 2x.
    feats = [torch.randn(1, 4, 9, 9, dtype=torch.float64), torch.randn(1, 6, 5, 5, dtype=torch.float64),
             torch.randn(1, 8, 3, 3, dtype=torch.float64)]
    fpn = FPN([4, 6, 8], 5, extra_source=extra_source, relu_before_extra=relu).double()
    outs = fpn(feats)
    lat = [conv(f) for conv, f in zip(fpn.lateral_convs, feats)]
    m5 = lat[2]
    m4 = lat[1] + F.interpolate(m5, size=(5, 5), mode="nearest")
    m3 = lat[0] + F.interpolate(m4, size=(9, 9), mode="nearest")
    p3, p4, p5 = (fpn.fpn_convs[i](m) for i, m in enumerate((m3, m4, m5)))
    p6 = fpn.extra_convs[0](feats[2] if extra_source == "input" else p5)
    p7 = fpn.extra_convs[1](F.relu(p6) if relu else p6)
    for got, want in zip(outs, (p3, p4, p5, p6, p7)):
        torch.testing.assert_close(got, want)
    assert [o.shape[-1] for o in outs] == [9, 5, 3, 2, 1]
    # nearest upsampling 3 -> 5 repeats rows as floor(i * 3 / 5): 0,0,1,1,2
    up = F.interpolate(m5, size=(5, 5), mode="nearest")
    torch.testing.assert_close(up[..., 1, :], up[..., 0, :])


def test_fpn_relu_changes_only_p7():
    feats = _feats()
    torch.manual_seed(0)
    a = FPN([32, 48, 64], 8, extra_source="output", relu_before_extra=False).double()
    b = FPN([32, 48, 64], 8, extra_source="output", relu_before_extra=True).double()
    b.load_state_dict(a.state_dict())
    oa, ob = a(feats), b(feats)
    for i in range(4):
        torch.testing.assert_close(oa[i], ob[i])
    assert not torch.allclose(oa[4], ob[4])


def test_fpn_init_and_errors():
    fpn = FPN([32, 48, 64], 16)
    for conv in [*fpn.lateral_convs, *fpn.fpn_convs, *fpn.extra_convs]:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform, gain 1
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.5 * bound
        assert torch.count_nonzero(conv.bias) == 0
    assert len(FPN([8, 16, 32], 8, num_outs=3).extra_convs) == 0
    with pytest.raises(ValueError, match="extra_source"):
        FPN([8], 8, extra_source="lateral")
    with pytest.raises(ValueError, match="num_outs"):
        FPN([8, 16, 32], 8, num_outs=2)
    with pytest.raises(ValueError, match="3 inputs"):
        FPN([8, 16, 32], 8)([torch.zeros(1, 8, 4, 4)])


# ---------------------------------------------------------------------------------------------
# Anchors and points
# ---------------------------------------------------------------------------------------------

# MMDetection's RetinaNet base anchors at stride 8 (octave_base_scale 4, 3 scales, ratios .5/1/2,
# center_offset 0), ratio-major: half-sizes 32·2^(i/3)/2 scaled by sqrt(ratio).
RETINA_STRIDE8_BASE = torch.tensor([
    [-22.6274, -11.3137, 22.6274, 11.3137],
    [-28.5088, -14.2544, 28.5088, 14.2544],
    [-35.9188, -17.9594, 35.9188, 17.9594],
    [-16.0000, -16.0000, 16.0000, 16.0000],
    [-20.1587, -20.1587, 20.1587, 20.1587],
    [-25.3984, -25.3984, 25.3984, 25.3984],
    [-11.3137, -22.6274, 11.3137, 22.6274],
    [-14.2544, -28.5088, 14.2544, 28.5088],
    [-17.9594, -35.9188, 17.9594, 35.9188],
], dtype=torch.float64)


def test_retinanet_base_anchors():
    gen = AnchorGenerator(STRIDES)
    assert gen.num_base_priors == 9 and gen.num_levels == 5
    torch.testing.assert_close(gen.base_anchors[0], RETINA_STRIDE8_BASE, atol=1e-4, rtol=0)
    # ratio 1: sides 32 · 2^(0, 1/3, 2/3); every level scales with its stride
    sides = gen.base_anchors[0][3:6, 2] - gen.base_anchors[0][3:6, 0]
    torch.testing.assert_close(sides, 32 * 2 ** torch.tensor([0, 1 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(gen.base_anchors[4], RETINA_STRIDE8_BASE * 16, atol=2e-3, rtol=0)
    # ratio = h / w and area preserved across ratios
    wh = gen.base_anchors[1][:, 2:] - gen.base_anchors[1][:, :2]
    ratios = torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3, dtype=torch.float64)
    torch.testing.assert_close(wh[:, 1] / wh[:, 0], ratios)
    torch.testing.assert_close((wh[:, 0] * wh[:, 1]).reshape(3, 3)[0], (wh[:, 0] * wh[:, 1]).reshape(3, 3)[2])


def test_anchor_grid_order_and_count():
    gen = AnchorGenerator(STRIDES)
    sizes = [(3, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
    anchors = gen.grid_priors(sizes, "cpu", torch.float64)
    assert [a.shape for a in anchors] == [(h * w * 9, 4) for h, w in sizes]
    h, w = sizes[0]
    for y in range(h):
        for x in range(w):
            for a in range(9):
                want = gen.base_anchors[0][a] + torch.tensor([x * 8, y * 8, x * 8, y * 8], dtype=torch.float64)
                torch.testing.assert_close(anchors[0][(y * w + x) * 9 + a], want)


def test_atss_anchors_are_point_squares_at_offset_zero():
    gen = AnchorGenerator(STRIDES, **ATSS_ANCHORS)
    assert gen.num_base_priors == 1
    sizes = [(4, 5), (2, 3), (1, 2), (1, 1), (1, 1)]
    anchors = gen.grid_priors(sizes, "cpu", torch.float32)
    assert [len(a) for a in anchors] == [h * w for h, w in sizes]
    torch.testing.assert_close(anchors[0][0], torch.tensor([-32.0, -32.0, 32.0, 32.0]))
    points = PointGenerator(STRIDES, offset=0.0).grid_priors(sizes)
    for a, p, s in zip(anchors, points, STRIDES):
        torch.testing.assert_close(a, points_to_boxes(p, s))


def test_center_offset_and_base_sizes():
    gen = AnchorGenerator(
        [16], octave_base_scale=1, scales_per_octave=1, ratios=[1.0], center_offset=0.5, base_sizes=[10]
    )
    torch.testing.assert_close(gen.base_anchors[0], torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64))


def test_points():
    gen = PointGenerator(STRIDES)  # offset 0.5 as MMDetection's FCOS
    pts = gen.grid_priors([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])
    want = torch.tensor([[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]], dtype=torch.float32)
    torch.testing.assert_close(pts[0], want)
    torch.testing.assert_close(pts[1], torch.tensor([[8.0, 8.0], [24.0, 8.0]]))
    strides = gen.grid_strides([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])
    assert strides[0].tolist() == [8.0] * 6 and strides[4].tolist() == [128.0]
    boxes = gen.grid_prior_boxes([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])
    torch.testing.assert_close(boxes[0][0], torch.tensor([-28.0, -28.0, 36.0, 36.0]))  # side 8 * 8 at (4, 4)
    # per-point strides, any side
    p = torch.tensor([[10.0, 20.0], [0.0, 0.0]])
    torch.testing.assert_close(points_to_boxes(p, torch.tensor([8.0, 16.0]), side=2),
                               torch.tensor([[2.0, 12.0, 18.0, 28.0], [-16.0, -16.0, 16.0, 16.0]]))
    torch.testing.assert_close(gen.points_to_boxes(p, 8.0), points_to_boxes(p, 8.0))


def test_priors_dtype_device_cache_and_errors():
    gen = AnchorGenerator(STRIDES)
    sizes = [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]  # 1333 x 800
    a16 = gen.grid_priors(sizes, "cpu", torch.float16)
    a32 = gen.grid_priors(sizes, "cpu", torch.float32)
    assert a16[0].dtype == torch.float16
    # built in float32 and rounded once: fp16 error is that of one rounding of the coordinate
    torch.testing.assert_close(a16[0].float(), a32[0], rtol=1e-3, atol=0.5)
    assert gen.grid_priors(sizes, "cpu", torch.float32)[0] is a32[0]  # cached
    empty = gen.grid_priors([(0, 0)] * 5)
    assert all(e.shape == (0, 4) for e in empty)
    with pytest.raises(ValueError, match="expected 5 feature sizes"):
        gen.grid_priors([(1, 1)])
    with pytest.raises(ValueError, match="ratios"):
        AnchorGenerator(STRIDES, ratios=[])
    with pytest.raises(ValueError, match="points"):
        points_to_boxes(torch.zeros(3, 4), 8)


# ---------------------------------------------------------------------------------------------
# Coders
# ---------------------------------------------------------------------------------------------


def _random_boxes(n, *, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 500
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 290 + 10  # size ratios < 1000/16: no clamp
    return torch.cat((xy, xy + wh), dim=-1)


def test_delta_coder_closed_form():
    prior = torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.float64)  # c (5, 10), 10 x 20
    gt = torch.tensor([[2.0, 4.0, 22.0, 24.0]], dtype=torch.float64)  # c (12, 14), 20 x 20
    d = DeltaXYWHCoder().encode(prior, gt)
    torch.testing.assert_close(d, torch.tensor([[0.7, 0.2, math.log(2), 0.0]], dtype=torch.float64))
    d = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2)).encode(prior, gt)
    torch.testing.assert_close(d, torch.tensor([[7.0, 2.0, math.log(2) / 0.2, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("means,stds", [((0, 0, 0, 0), (1, 1, 1, 1)), ((0.1, -0.2, 0.3, 0.0), (0.1, 0.1, 0.2, 0.2))])
def test_delta_coder_round_trip(means, stds):
    coder = DeltaXYWHCoder(means, stds)
    priors, gts = _random_boxes(500, seed=1), _random_boxes(500, seed=2)
    torch.testing.assert_close(coder.decode(priors, coder.encode(priors, gts)), gts, rtol=0, atol=1e-9)
    # leading dims broadcast: (B, N, 4) deltas on (N, 4) priors
    deltas = coder.encode(priors, gts)[None].expand(3, -1, -1)
    assert coder.decode(priors, deltas).shape == (3, 500, 4)


def test_delta_coder_clamps():
    coder = DeltaXYWHCoder()
    prior = torch.tensor([[100.0, 100.0, 110.0, 120.0]])
    boxes = coder.decode(prior, torch.tensor([[0.0, 0.0, 50.0, -50.0]]))
    w, h = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    torch.testing.assert_close(w, torch.tensor(10 * 1000 / 16))  # exp(log(1000/16)) times the prior
    torch.testing.assert_close(h, torch.tensor(20 * 16 / 1000))
    boxes = coder.decode(prior, torch.tensor([[0.0, 0.0, 50.0, 0.0]]), max_shape=(130, 200))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 100.0, 200.0, 120.0]]))
    with pytest.raises(ValueError, match="deltas"):
        coder.decode(prior, torch.zeros(1, 3))


def test_distance_coder():
    coder = DistancePointCoder()
    pts = torch.tensor([[10.0, 20.0]], dtype=torch.float64)
    box = torch.tensor([[4.0, 5.0, 30.0, 26.0]], dtype=torch.float64)
    torch.testing.assert_close(coder.encode(pts, box), torch.tensor([[6.0, 15.0, 20.0, 6.0]], dtype=torch.float64))
    clamped = coder.encode(pts, box, max_dis=10.0)  # to [0, max_dis - eps], eps = 0.1
    torch.testing.assert_close(clamped, torch.tensor([[6.0, 9.9, 9.9, 6.0]], dtype=torch.float64))
    # round trip for points inside their boxes
    boxes = _random_boxes(300, seed=3)
    g = torch.Generator().manual_seed(4)
    t = torch.rand(300, 2, generator=g, dtype=torch.float64)
    points = boxes[:, :2] + t * (boxes[:, 2:] - boxes[:, :2])
    dist = coder.encode(points, boxes)
    assert (dist >= 0).all()
    torch.testing.assert_close(coder.decode(points, dist), boxes, rtol=0, atol=1e-9)
    clamped = coder.decode(pts, torch.tensor([[20.0, 30.0, 5.0, 100.0]], dtype=torch.float64), max_shape=(50, 12))
    torch.testing.assert_close(clamped, torch.tensor([[0.0, 0.0, 12.0, 50.0]], dtype=torch.float64))
