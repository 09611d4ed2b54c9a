"""The experiments built on the running study: the block sweep, the methods study, the training-length study, the
replicated study, the eye-check, the block analyzer, the quality gates and the reference metrics' validation."""
