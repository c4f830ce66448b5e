"""The method contract, kept importable from its old place: it lives in :mod:`benchmark.method`."""

from benchmark.method import Method, MethodConfig, TrainData

__all__ = ["Method", "MethodConfig", "TrainData"]
