"""The quantized modules: ``MoBiLinear`` (:mod:`.linear`) and the per-token ``TokenRouter`` (:mod:`.router`)."""
