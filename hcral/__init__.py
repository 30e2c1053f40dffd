"""hcral: Hybrid Classification-Regression Adaptive Loss (arXiv:2408.17182) for dense detectors."""

__version__ = "0.1.0"
