"""HCRAL's losses inside other libraries' detectors.

- :mod:`hcral.integrations.torchvision`: HCRA-C and HCRA-R in torchvision's own ``FCOS`` and
  ``RetinaNet`` (their heads, matchers and post-processing kept).
"""
