"""samsr.engine."""
