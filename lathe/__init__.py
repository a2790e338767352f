"""Lathe: compress plant-floor models and keep the evidence auditors ask for.

The core library. Pure, typed functions; nothing here knows about argv, DVC or Prefect.
"""

__version__ = "0.1.0"
