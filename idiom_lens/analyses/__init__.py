"""Analyses, each a function from (model, probes, options) to a frozen result: memorization, the
layer trajectory and its phases, direct logit attribution and its statistics, interventions."""
