"""mobiquant's Hydra launcher: ``hydra/launcher=gpus`` (one job per GPU of this host, G at a time).

Hydra finds launchers under the ``hydra_plugins`` namespace package (no ``__init__.py`` there on purpose).
"""
