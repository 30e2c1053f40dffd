"""HCRAL's losses inside other libraries' detectors.

- :mod:`hcral.integrations.torchvision`: HCRA-C and HCRA-R in torchvision's own ``FCOS`` and
  ``RetinaNet`` (their heads, matchers and post-processing kept).
- :mod:`hcral.integrations.mmdet`: an MMDetection 3.3 plugin (``custom_imports``) with HCRA-C,
  HCRA-R, EATSS and ATSS/RetinaNet head subclasses; configs in ``configs/mmdet/``, ``docs/mmdet.md``.
"""
