"""Probe records, bundled probe sets and their loaders (see docs/datasets.md).

The builder (`idiom_lens.datasets.build`) is not imported here: it needs build-time packages
that the runtime library does not.
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

__all__ = [
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
    "load_probes",
    "mark_single_target",
    "parse_flag",
]
