"""Ensemble stage: rank trained bundles, memory-bounded ensemble, scores, challenge export."""
