"""The study: running every stage on a model into one results folder, resuming, the report and
the comparison of models, all reading and writing that folder through one layout."""
