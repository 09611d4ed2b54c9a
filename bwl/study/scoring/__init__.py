"""Scoring: the metric families (the toy world's probes, the reference metrics for real models), per-image scores
and their confidence intervals, the results table, the claims C1-C3 decided from it, the hierarchical bootstrap, Holm
and the pooled comparisons of the replicated study. Imports only the design room."""
