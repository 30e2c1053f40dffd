"""Detection models: backbones, FPN, prior generators, box coders, heads and detectors."""
