# atss_lite0_fpn_aquarium_cpu.py with HCRA-C (formulation §3) as the classification loss: the
# HCRA-C arm of the plugin's measurement, as hcral's §10e cell `hcra_c` (GIoU, ATSS, centerness
# unchanged). Only the head type (it hands HCRA-C u, §1) and loss_cls change.
_base_ = "./atss_lite0_fpn_aquarium_cpu.py"

model = dict(
    bbox_head=dict(
        type="HCRAATSSHead",
        # Weight 2: docs/results.md §10a's choice for HCRA-C on Aquarium, §10e's weight. hcral's HCRA-C
        # and this one both pool the 5 levels into one call (§3), so the weight means the same here.
        loss_cls=dict(_delete_=True, type="HCRACLoss", use_sigmoid=True, loss_weight=2.0),
    ),
)
