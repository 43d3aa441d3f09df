"""The ``task=`` entry points: quantize (the default), lm_eval, decode and the analyses (outliers, routers)."""
