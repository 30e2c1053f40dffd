"""The model-agnostic detector: backbone -> FPN -> dense head.

In training mode ``forward(images, targets)`` returns the head's dict of weighted loss terms; in
eval mode ``forward(images, image_sizes=...)`` returns one dict of detections per image
(``boxes`` (K, 4) xyxy in input pixels, ``scores`` (K,), ``labels`` (K,)), as torchvision's detectors do.
"""

from __future__ import annotations

from torch import Tensor, nn

from hcral.models.heads.dense_head import DenseHead


class Detector(nn.Module):
    def __init__(self, backbone: nn.Module, neck: nn.Module, head: DenseHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head

    def forward(
        self,
        images: Tensor,
        targets: list[dict] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        feats = self.neck(self.backbone(images))
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets; call model.eval() for detections")
            return self.head.loss(feats, targets)
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.head.predict(feats, image_sizes)
