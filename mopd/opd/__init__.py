"""On-policy training built from seams (issue #23; STYLE "Training loops from seams"): a rollout
batch record, a sampler, scorers, shapers, one update and one loop, plus the method registry and
the distill section's settings. This ``__init__`` imports nothing, so each module counts alone in
a stage's code identity."""
