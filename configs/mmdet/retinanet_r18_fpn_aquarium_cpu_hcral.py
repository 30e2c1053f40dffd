# CPU variant of retinanet_r50_fpn_1x_coco_hcral.py on Aquarium: same head and losses
# (HCRARetinaHead, HCRA-C, HCRA-R, max-IoU assigner), a small model and a short schedule for a CPU.
# Train (from the repository root):
#   python -m hcral.integrations.mmdet_train configs/mmdet/retinanet_r18_fpn_aquarium_cpu_hcral.py --work-dir runs/mmdet_retina_aq
_base_ = "./retinanet_r50_fpn_1x_coco_hcral.py"

# ---- small CPU model: ResNet-18 without pretrained weights (no network), narrow FPN and head ----
model = dict(
    backbone=dict(depth=18, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64),
    bbox_head=dict(num_classes=7, in_channels=64, feat_channels=64, stacked_convs=2),
)

# ---- Aquarium (YOLO format, 7 classes), read by hcral's YOLO reader (HCRALYOLODataset) ----
# data_root is relative to the repository root: run from there.
data_root = "../shared/datasets/aquarium/"
img_scale = (256, 256)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=img_scale, keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=img_scale, keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    # "instances": CocoMetric(ann_file=None) builds its ground truth from them.
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "instances")),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True, type="HCRALYOLODataset", data_root=data_root, ann_file="data.yaml", split="train",
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True, type="HCRALYOLODataset", data_root=data_root, ann_file="data.yaml", split="val",
        test_mode=True, pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(_delete_=True, type="CocoMetric", ann_file=None, metric="bbox", format_only=False)
test_evaluator = val_evaluator

# ---- a short iteration-based CPU schedule ----
max_iters = 200
train_cfg = dict(_delete_=True, type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
param_scheduler = [dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=50)]
optim_wrapper = dict(optimizer=dict(lr=0.01), clip_grad=dict(max_norm=35, norm_type=2))
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=10),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max_iters),
)
log_processor = dict(by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend="gloo"))
