"""HCRAL's hyperparameter defaults (formulation §6), in one place.

Every function, module and config field takes its default from here. The values are the ones the
project's sweeps chose on RetinaNet (docs/results.md, section 4; experiments/sweep_*.yaml). The
paper searched on RetinaNet too and reused its values for ATSS and FCOS+ATSS.

They are what HCRAL runs with when a config selects it. A config that selects nothing gets
``LossConfig``'s defaults, FL + GIoU + ATSS, which is what the evidence supports (docs/results.md,
summary): no HCRAL module beat what it replaces significantly in any study here.
"""

HCRA_ALPHA = -0.1  # §2, α: offset of the region boundary score = IoU + α
HCRA_THETA = 8.0  # §3, θ: sharpness of RCI_cls (provisional 2.0; the sweep chose 8)
HCRA_MU = 0.5  # §3, μ: null point of CF_cls (ω)
HCRA_EP = 1.0  # §4, ep: smoothing of RCI_reg (ρ)
HCRA_GAMMA_RETINANET = 0.5  # §4, γ of CF_reg on RetinaNet; ATSS-style heads use 0 (§6)
EATSS_MAX_EXTRA = 4  # §5, l: most extra positives per GT
