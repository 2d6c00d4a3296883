"""Models: loading a spec into a TransformerBridge, tokenizing probes, batched forward passes,
the logit-lens read-out, the real-vocabulary mask and the run-time self-checks of fast paths."""
