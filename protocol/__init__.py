"""Slotcast wire protocol v1: pure types and codecs, no I/O.

Everything above this package (store, server, the Python client) speaks in these
types, so the vocabulary of the product lives in exactly one place.
"""
