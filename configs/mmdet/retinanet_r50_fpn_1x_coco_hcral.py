# RetinaNet R50-FPN 1x COCO (MMDetection's own config) with HCRA-C and HCRA-R (formulation §3, §4).
# Only the head type and its two losses change; RetinaNet keeps its max-IoU assigner (0.5 / 0.4).
# HCRA-R is built on GIoU (§4), so the boxes are regressed decoded (reg_decoded_bbox=True), as
# MMDetection's GIoU RetinaNet does. Hyperparameters: §6 / hcral.defaults.
# Train: python -m hcral.integrations.mmdet_train configs/mmdet/retinanet_r50_fpn_1x_coco_hcral.py
_base_ = "mmdet::retinanet/retinanet_r50_fpn_1x_coco.py"

custom_imports = dict(imports=["hcral.integrations.mmdet"], allow_failed_imports=False)

model = dict(
    bbox_head=dict(
        type="HCRARetinaHead",
        reg_decoded_bbox=True,
        # HCRA-C on GHM-C; weight 1 (pooled over levels, see the ATSS config and docs/mmdet.md).
        loss_cls=dict(_delete_=True, type="HCRACLoss", use_sigmoid=True, loss_weight=1.0),
        # γ = 0.5 on RetinaNet (§6); weight 2, hcral's reg_weight (MMDetection's ATSS/FCOS GIoU weight).
        loss_bbox=dict(_delete_=True, type="HCRARLoss", gamma=0.5, loss_weight=2.0),
    ),
)
# hcral's own COCO RetinaNet config also clips gradients at 35 (as MMDetection's GHM RetinaNet):
# add it with --cfg-options optim_wrapper.clip_grad.max_norm=35 optim_wrapper.clip_grad.norm_type=2
