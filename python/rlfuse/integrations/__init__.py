"""Integrations with RL trainers. Each submodule imports its trainer lazily; ``import rlfuse`` never does.

- ``rlfuse.integrations.trl``: ``RLFuseGRPOTrainer``, a drop-in ``trl.GRPOTrainer`` (``pip install rlfuse[trl]``).
- ``rlfuse.integrations.verl``: rlfuse losses in verl's policy-loss registry and drop-in log-prob /
  entropy helpers (``pip install rlfuse[verl]``).
"""
