"""End to end: every head with every loss family, training, evaluation, prediction, exact resume,
DDP on CPU, images without objects, real data (raccoon), and the CLI."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torchvision.transforms.v2.functional import to_pil_image

from hcral.cli import main as cli_main
from hcral.config import Config, load_config
from hcral.data import collate
from hcral.experiments.analyze import SCORE_IOU_METRICS
from hcral.models.build import build_model
from hcral.runner import CHECKPOINT, build_dataset, load_checkpoint, train

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "raccoon"
# COCO AP; metrics.json adds SCORE_IOU_METRICS (the correlations only where defined).
METRIC_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def tiny_overrides(out: Path | str) -> list[str]:
    """A detector small enough for a few steps a second on one CPU thread."""
    return [
        "model.fpn_channels=32", "model.head_channels=32", "model.head_convs=1",
        "data.synthetic_train=8", "data.synthetic_val=4", "data.synthetic_size=96",
        "data.short_side=96", "data.max_side=96", "data.batch_size=2", "data.num_workers=0",
        "train.epochs=1", "train.warmup_iters=2", "train.log_interval=1", "train.lr=0.01",
        "eval.batch_size=4", f"out_dir={out}",
    ]


def tiny_config(out: Path | str, *extra: str) -> Config:
    return load_config(overrides=tiny_overrides(out) + list(extra))


HEADS = [("retinanet", "max_iou"), ("atss", "atss"), ("atss", "eatss"), ("fcos_atss", "atss"), ("fcos_atss", "eatss")]
LOSSES = [("focal", "giou"), ("hcra_c", "hcra_r"), ("qfl", "diou"), ("vfl", "ciou"), ("ghmc", "eiou"), ("focal", "focal_eiou")]


@pytest.mark.parametrize(("detector", "assigner"), HEADS)
@pytest.mark.parametrize(("cls", "reg"), LOSSES)
def test_training_step_of_every_head_and_loss(tmp_path, detector, assigner, cls, reg):
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, f"model.detector={detector}", f"loss.assigner={assigner}", f"loss.cls={cls}", f"loss.reg={reg}")
    dataset = build_dataset(cfg, train=True)
    model = build_model(cfg, dataset.num_classes).train()
    images, targets = collate([dataset[i] for i in range(2)], size_divisor=32)
    terms = model(images, targets)
    expected = {"loss_cls", "loss_reg"} | ({"loss_centerness"} if detector != "retinanet" else set())
    assert set(terms) == expected
    for name, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(terms.values()).backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(("detector", "assigner"), [("retinanet", "max_iou"), ("fcos_atss", "eatss")])
def test_images_without_objects_train_as_negatives(tmp_path, detector, assigner):
    cfg = tiny_config(tmp_path, f"model.detector={detector}", f"loss.assigner={assigner}", "loss.cls=hcra_c", "loss.reg=hcra_r")
    dataset = build_dataset(cfg, train=True)
    model = build_model(cfg, dataset.num_classes).train()
    images, targets = collate([dataset[0], dataset[1]], size_divisor=32)
    for t in targets:  # both images empty: only negatives
        t["boxes"], t["labels"] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    terms = model(images, targets)
    assert terms["loss_reg"].item() == 0.0 and terms["loss_reg"].requires_grad
    assert terms["loss_cls"].item() > 0
    sum(terms.values()).backward()


def test_loss_goes_down_on_a_tiny_overfit_set(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, "loss.cls=hcra_c", "loss.reg=hcra_r", "loss.assigner=eatss", "data.flip_prob=0.0")
    dataset = build_dataset(cfg, train=True)
    model = build_model(cfg, dataset.num_classes).train()
    images, targets = collate([dataset[i] for i in range(4)], size_divisor=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(40):
        terms = model(images, targets)
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: v.item() for k, v in terms.items()})
    first, last = history[:3], history[-3:]

    def total(rows, name):
        return sum(h[name] for h in rows)

    # FCOS+ATSS starts from the prior squares (GIoU loss ≈ 1.2, not ≈ 2 for zero-size boxes), so
    # the regression loss has less to lose in 40 steps than the classification loss.
    assert total(last, "loss_reg") < 0.85 * total(first, "loss_reg")
    # GHM's moving average starts at zero, which inflates the first values; compare from step 3.
    assert total(last, "loss_cls") < 0.6 * total(history[3:6], "loss_cls")
    # Centerness is a BCE against soft targets: its floor is their entropy (~0.6 here), not 0.
    # Centerness BCE has a floor at its soft targets' entropy (≈ 0.6 a term), so it moves little.
    assert total(last, "loss_centerness") < 0.99 * total(first, "loss_centerness")


def test_train_writes_run_folder_and_eval_and_predict_work(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, "train.max_iters=3")
    metrics = train(cfg, progress=False)
    assert set(metrics) - set(SCORE_IOU_METRICS) == METRIC_KEYS and "score_iou_n" in metrics
    for key in METRIC_KEYS:
        assert metrics[key] == -1 or 0.0 <= metrics[key] <= 1.0, key
    for name in ("config.yaml", "log.jsonl", CHECKPOINT, "metrics.json", "detections.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "metrics.json").read_text()) == metrics
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3]
    assert {"loss_cls", "loss_reg", "loss_centerness", "lr", "eta_s", "step_time"} <= set(steps[0])
    # The resolved config reloads to the same config.
    assert load_config(run / "config.yaml") == cfg

    # `hcral eval` on the checkpoint gives the same numbers.
    assert cli_main(["eval", str(run / "config.yaml"), "--checkpoint", str(run / CHECKPOINT), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == metrics
    for name in ("config.yaml", "log.jsonl", CHECKPOINT, "detections.json"):
        assert (tmp_path / "ev" / name).exists(), name

    # `hcral predict` writes COCO-format JSON and one PNG per image.
    images = []
    dataset = build_dataset(cfg, train=False)
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        to_pil_image(dataset.load_image(i)).save(path)
        images.append(str(path))
    code = cli_main(["predict", str(run / "config.yaml"), "--checkpoint", str(run / CHECKPOINT), *images, "--out", str(tmp_path / "pred")])
    assert code == 0
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert isinstance(preds, list)
    for p in preds:
        assert {"image_id", "category_id", "bbox", "score", "file_name"} <= set(p)
    assert (tmp_path / "pred" / "img0.png").is_file() and (tmp_path / "pred" / "img1.png").is_file()


def test_resume_after_stopping_equals_a_run_that_never_stopped(tmp_path):
    # 8 images, batch 2: 4 iterations an epoch; 2 epochs. The stop falls mid-epoch (iteration 5).
    common = ["train.epochs=2", "loss.cls=hcra_c", "loss.reg=hcra_r", "loss.assigner=eatss", "train.eval_interval=0"]
    straight = tiny_config(tmp_path / "straight", *common)
    train(straight, progress=False)
    stopped = tiny_config(tmp_path / "resumed", *common, "train.max_iters=5")
    train(stopped, progress=False)
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT)["global_iter"] == 5
    resumed = tiny_config(tmp_path / "resumed", *common)
    train(resumed, resume=True, progress=False)

    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "resumed" / CHECKPOINT)
    assert a["global_iter"] == b["global_iter"] == 8
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key  # exact, GHM state included
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(run, "train.max_iters=1", "train.eval_interval=0"), progress=False)
    before = (run / CHECKPOINT).read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config(run, "train.max_iters=2", "train.eval_interval=0"), resume=True, progress=False)
    assert (run / CHECKPOINT).read_bytes() == before  # the old checkpoint survives intact
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = tiny_config(out, "data.batch_size=1", "train.max_iters=3", "data.flip_prob=0.0", "train.amp=false")
    try:
        train(cfg, progress=False)
        (Path(out) / f"rank{rank}.done").write_text("ok")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_on_cpu_equals_one_process_with_the_whole_batch(tmp_path):
    out = tmp_path / "ddp"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    assert (out / "rank0.done").is_file() and (out / "rank1.done").is_file()
    ddp = load_checkpoint(out / CHECKPOINT)
    assert set(json.loads((out / "metrics.json").read_text())) - set(SCORE_IOU_METRICS) == METRIC_KEYS

    # One process, batch 2 = the two ranks' batches of 1: same images per step, same normalisers.
    # float32: bf16 rounds a batch of 1 and a batch of 2 differently, so only float32 sums agree.
    single = tiny_config(tmp_path / "single", "data.batch_size=2", "train.max_iters=3", "data.flip_prob=0.0", "train.amp=false")
    train(single, progress=False)
    ref = load_checkpoint(tmp_path / "single" / CHECKPOINT)
    for key in ref["model"]:
        torch.testing.assert_close(ddp["model"][key], ref["model"][key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(not RACCOON.is_dir(), reason="../shared/datasets/raccoon not present")
def test_smoke_run_on_raccoon(tmp_path):
    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "raccoon_fcos_atss_hcral.yaml",
        [f"data.root={RACCOON}", "train.max_iters=2", "data.short_side=128", "data.max_side=160",
         "data.num_workers=0", "model.fpn_channels=32", "model.head_channels=32", "model.head_convs=1",
         f"out_dir={tmp_path}"],
    )
    metrics = train(cfg, progress=False)
    assert set(metrics) - set(SCORE_IOU_METRICS) == METRIC_KEYS and "score_iou_n" in metrics
    gt = build_dataset(cfg, train=False).coco_gt()
    assert len(gt["images"]) == 40
    detections = json.loads((tmp_path / "detections.json").read_text())
    assert {d["image_id"] for d in detections} <= {im["id"] for im in gt["images"]}


def test_cli_reports_bad_config_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  cls: focal_loss\n")
    assert cli_main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "loss.cls" in err and "'hcra_c'" in err
    assert cli_main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_assigner_must_fit_the_detector(tmp_path):
    with pytest.raises(ValueError, match="does not fit model.detector='retinanet'; valid: max_iou"):
        build_model(tiny_config(tmp_path, "model.detector=retinanet", "loss.assigner=atss"), 3)


def test_fused_hcra_c_in_the_head_equals_eager(tmp_path):
    from hcral.losses import FusedHCRAClassificationLoss

    losses = {}
    for fused in (False, True):
        torch.manual_seed(0)
        cfg = tiny_config(tmp_path, "loss.cls=hcra_c", "loss.reg=hcra_r", f"loss.hcra_fused={str(fused).lower()}")
        dataset = build_dataset(cfg, train=True)
        model = build_model(cfg, dataset.num_classes).train()
        assert isinstance(model.head.cls_loss_module, FusedHCRAClassificationLoss) == fused
        if fused:  # run the fused stages eagerly: tests the wiring without a 20 s compile
            model.head.cls_loss_module.compiled = False
        images, targets = collate([dataset[i] for i in range(2)], size_divisor=32)
        losses[fused] = model(images, targets)["loss_cls"]
    torch.testing.assert_close(losses[True], losses[False])


# ---- fidelity to the reference heads (issue 13, section 1) ------------------------------------


def test_fcos_atss_first_boxes_are_the_prior_squares(tmp_path):
    # The official ATSS point mode: bias 4 under the stride-normalised decode, so before training
    # each point's box is its 8·stride assigner square (and not a zero-size box with IoU ≈ 0).
    cfg = tiny_config(tmp_path, "model.detector=fcos_atss")
    model = build_model(cfg, 3)
    head = model.head
    torch.nn.init.zeros_(head.reg_out.weight)  # the bias alone (weights are N(0, 0.01) noise)
    images, _ = collate([build_dataset(cfg, train=True)[0]], size_divisor=32)
    feats = model.neck(model.backbone(images))
    _, reg, _, sizes = head(feats)
    layout = head.prior_layout(sizes, reg.device)
    torch.testing.assert_close(head.decode(layout, reg)[0], layout.assign_boxes)


@pytest.mark.parametrize(("detector", "assigner", "nms_iou"), [("retinanet", "max_iou", 0.5), ("atss", "atss", 0.6), ("fcos_atss", "atss", 0.6)])
def test_nms_iou_follows_the_detector_unless_set(tmp_path, monkeypatch, detector, assigner, nms_iou):
    import hcral.models.heads.dense_head as dense_head

    seen = []

    def spy(*args, iou_threshold, **kwargs):
        seen.append(iou_threshold)
        return real(*args, iou_threshold=iou_threshold, **kwargs)

    real = dense_head.select_detections
    monkeypatch.setattr(dense_head, "select_detections", spy)
    for extra, expected in (([], nms_iou), (["eval.nms_iou=0.45"], 0.45)):
        cfg = tiny_config(tmp_path, f"model.detector={detector}", f"loss.assigner={assigner}", *extra)
        model = build_model(cfg, 3).eval()
        images, targets = collate([build_dataset(cfg, train=False, class_names=None)[0]], size_divisor=32)
        model(images, image_sizes=[t["size"] for t in targets])
        assert seen[-1] == expected


@pytest.mark.parametrize("normalize", [False, True])
def test_focal_base_in_the_head_reduces_to_focal_loss(tmp_path, normalize):
    # loss.hcra_cls_base=focal with both modules off is the head's focal loss, §3c or not.
    torch.manual_seed(0)
    losses = {}
    for name, extra in (
        ("focal", ["loss.cls=focal"]),
        ("rci_cf_focal", ["loss.cls=hcra_c", "loss.hcra_cls_base=focal", "loss.hcra_cls_rci=false",
                          "loss.hcra_cls_cf=false", f"loss.hcra_cls_normalize={str(normalize).lower()}"]),
    ):
        cfg = tiny_config(tmp_path, "model.detector=fcos_atss", *extra)
        torch.manual_seed(0)
        model = build_model(cfg, 3).train()
        images, targets = collate([build_dataset(cfg, train=True)[i] for i in range(2)], size_divisor=32)
        losses[name] = model(images, targets)["loss_cls"]
    assert torch.equal(losses["focal"], losses["rci_cf_focal"])
    # And with the modules on it differs (the weights act).
    cfg = tiny_config(tmp_path, "model.detector=fcos_atss", "loss.cls=hcra_c", "loss.hcra_cls_base=focal")
    torch.manual_seed(0)
    model = build_model(cfg, 3).train()
    assert not torch.equal(model(images, targets)["loss_cls"], losses["focal"])
