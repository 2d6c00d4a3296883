"""Probe records, bundled probe sets and their loaders (see docs/datasets.md).

The builder (`idiom_lens.datasets.build`, with `wikipedia` and `fact_sources`) is not imported
here: it needs build-time packages that the runtime library does not. The optional model-based
flag needs a model, so it is an analysis (`idiom_lens.analyses.model_flags`).
"""

from idiom_lens.datasets.loaders import (
    attach_flags,
    bundled_dir,
    bundled_names,
    bundled_path,
    export_probes,
    load_probes,
    mark_single_target,
    parse_flag,
)
from idiom_lens.datasets.probes import FLAG_NAMES, PROBE_KINDS, Probe, ProbeKind, ProbeSet
from idiom_lens.datasets.relations import FACT_RELATIONS, fact_relation

__all__ = [
    "FACT_RELATIONS",
    "FLAG_NAMES",
    "PROBE_KINDS",
    "Probe",
    "ProbeKind",
    "ProbeSet",
    "attach_flags",
    "bundled_dir",
    "bundled_names",
    "bundled_path",
    "export_probes",
    "fact_relation",
    "load_probes",
    "mark_single_target",
    "parse_flag",
]
