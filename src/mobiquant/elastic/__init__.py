"""Run-time elasticity: budget plans (:mod:`.plan`) and their search per router site (:mod:`.site_budgets`)."""
