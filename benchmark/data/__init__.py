"""Data: the common record type, readers for real caption formats, the synthetic generator,
and the torch datasets that feed training and evaluation."""
