"""Lenses (logit, tuned, Jacobian) that read intermediate layers, their offline training and cache.

- `lens`: the `Lens` (translators per layer, save/load, the model check);
- `corpus`: the training text, offline, with every probe prompt kept out;
- `train`: collecting residuals, training the tuned lens, fitting the Jacobian lens, held-out KL;
- `settings`: `LensSettings`, every training choice (the cache key);
- `cache`: `obtain_lens` / `resolve_lens`, trained once per model, kind, corpus and settings.

Nothing is imported here, so that `idiom_lens.lenses.settings` stays free of torch; the public
names are on `idiom_lens` (`from idiom_lens import obtain_lens, Lens, LensSettings`).
"""
