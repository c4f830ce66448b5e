"""The built-in continual-learning methods (implementations only).

The contract they implement and the registry that names them belong to the harness
(:mod:`benchmark.method`); this package keeps its old names importable. ``python -m benchmark
run --methods NAME[,NAME...]`` accepts, for each entry:

* a registered name (``python -m benchmark methods`` lists them),
* ``package.module:ClassName`` — any importable :class:`benchmark.Method` subclass,
* a name published by an installed package under the entry-point group ``benchmark.methods``.

Importing this package imports no method module: each is imported when its name is first used.
"""

from __future__ import annotations

from benchmark.method import (ENTRY_POINT_GROUP, Method, MethodConfig, TrainData, available_methods, get_method,
                              register_method)

__all__ = ["Method", "MethodConfig", "TrainData", "available_methods", "get_method", "register_method",
           "ENTRY_POINT_GROUP"]
