"""Serving engines, one module each; the contract is in `base.py`."""
