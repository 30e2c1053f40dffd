"""The result every assigner returns, and its label convention.

Label convention (one value per prior, in ``gt_index``):

- ``j >= 0``: positive, assigned to ground truth ``j`` (its index in the image's ``gt_boxes``;
  in a batched result, its index in the image's row of the padded ``(B, M, 4)`` tensor);
- ``BACKGROUND = -1``: negative, trained towards "no object";
- ``IGNORED = -2``: excluded from the classification loss (max-IoU band between the negative and
  positive thresholds, or a prior inside an ignore region).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BACKGROUND", "IGNORED", "Assignment"]

BACKGROUND = -1
IGNORED = -2


@dataclass
class Assignment:
    """Assignment of priors to ground truths, for one image ``(N,)`` or a batch ``(B, N)``.

    Fields (same leading shape, on the priors' device):

    - ``gt_index`` int64: the assigned GT (``>= 0``), ``BACKGROUND`` (-1) or ``IGNORED`` (-2);
    - ``labels`` int64: the class of the assigned GT for positives, -1 everywhere else;
    - ``max_iou`` float: for positives, the IoU of the *prior box* with its assigned GT. For the
      other priors: the max-IoU assigner stores the largest IoU over all GTs (the value its
      thresholds were applied to); ATSS/EATSS store 0, since they only compute IoUs at candidates
      (a full (N, M) IoU pass would double their cost for a number no loss uses);
    - ``expanded`` bool: True exactly for the positives that EATSS added beyond ATSS (§5).
    """

    gt_index: Tensor
    labels: Tensor
    max_iou: Tensor
    expanded: Tensor

    @property
    def pos_mask(self) -> Tensor:
        return self.gt_index >= 0

    @property
    def neg_mask(self) -> Tensor:
        return self.gt_index == BACKGROUND

    @property
    def ignore_mask(self) -> Tensor:
        return self.gt_index == IGNORED

    @property
    def num_pos(self) -> int:
        """Number of positives (a host sync on GPU)."""
        return int(self.pos_mask.sum().item())

    def unbind(self) -> list[Assignment]:
        """A batched ``(B, N)`` result as a list of B per-image ``(N,)`` results (views)."""
        if self.gt_index.dim() != 2:
            raise ValueError(f"unbind needs a batched (B, N) Assignment, got gt_index {tuple(self.gt_index.shape)}")
        return [
            Assignment(g, lab, iou, ext)
            for g, lab, iou, ext in zip(self.gt_index, self.labels, self.max_iou, self.expanded)
        ]

    @staticmethod
    def background(shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype = torch.float32) -> Assignment:
        """Every prior background: what an image with no GT (or no priors) gets."""
        return Assignment(
            gt_index=torch.full(shape, BACKGROUND, dtype=torch.long, device=device),
            labels=torch.full(shape, -1, dtype=torch.long, device=device),
            max_iou=torch.zeros(shape, dtype=dtype, device=device),
            expanded=torch.zeros(shape, dtype=torch.bool, device=device),
        )
