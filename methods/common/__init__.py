"""Mechanisms that several methods share (written once): task routing by K-means keys,
frozen-feature extraction, key-query prompt selection."""
