"""Integrations of qins with other libraries, each in its own subpackage.

* :mod:`qins.integrations.transformers`: ``save_pretrained`` / ``from_pretrained`` of QINS models,
  quantize on load, ``qins quantize`` on checkpoints, and the legacy remote-code patch.

The core of qins never imports this package: the integrations import the core, not the other way.
"""
