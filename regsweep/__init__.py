"""regsweep: what L1/L2 regularisation does to a small MNIST network, with every run tracked in MLflow."""

__version__ = "0.1.0"
