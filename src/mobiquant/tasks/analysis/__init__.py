"""Analysis tasks of the Hydra app: ``task=outliers`` (outlier migration) and ``task=routers`` (routing).

Each module exposes ``run(cfg) -> float``, registered in :data:`mobiquant.__main__.TASKS`.
"""
