# ATSS R50-FPN 1x COCO (MMDetection's own config) with HCRAL: HCRA-C, HCRA-R and EATSS
# (formulation §3-§5, hyperparameters §6 / hcral.defaults). Only the head type, its two losses and
# the assigner change; the centerness loss, schedule, data and everything else are MMDetection's.
# Train: python -m hcral.integrations.mmdet_train configs/mmdet/atss_r50_fpn_1x_coco_hcral.py
_base_ = "mmdet::atss/atss_r50_fpn_1x_coco.py"

custom_imports = dict(imports=["hcral.integrations.mmdet"], allow_failed_imports=False)

model = dict(
    bbox_head=dict(
        type="HCRAATSSHead",
        # HCRA-C on GHM-C (30 bins, momentum 0.75: §6 detector configs); loss weight 1 as MMDetection's
        # GHM-C. HCRA-C is one pooled call over the 5 levels (§3), MMDetection's GHM-C one call per
        # level, so at equal weight it weighs roughly 1/5 as much (docs/mmdet.md); §6: each
        # classification loss's weight is a hyperparameter of its own.
        loss_cls=dict(_delete_=True, type="HCRACLoss", use_sigmoid=True, loss_weight=1.0),
        # HCRA-R with γ = 0 (§6: set aside for ATSS); the weight of the GIoU loss it replaces.
        loss_bbox=dict(_delete_=True, type="HCRARLoss", gamma=0.0, loss_weight=2.0),
    ),
    # EATSS: ATSS's topk = 9 plus at most l = 4 extra positives per GT (§5, §6).
    train_cfg=dict(assigner=dict(_delete_=True, type="EATSSAssigner", topk=9, max_extra=4)),
)
