"""The layer trajectory (method.md section 3): the logit lens at the last prompt position.

For every probe and layer, four sites are read through the model's own final norm and
unembedding: the residual after the block (`resid_post`), after the attention sublayer
(`resid_mid`), and the attention and MLP outputs (`attn_out`, `mlp_out`, read alone). For the
model's final predicted token and for the target token we keep the rank (0 = top-1) and the
probability, plus the entropy and the argmax of the read-out distribution.

One batched forward pass per batch gives both the trajectory and the memorization records
(the last layer's read-out is the model's own output, which the tests check).

A masked LM (BERT) is read at its mask, block outputs only, through its MLM head (dense, GELU,
LayerNorm, decoder: `models.readout.final_transform`): Hugging Face's hidden states through `cls`.

`lens` picks how a layer is read (`idiom_lens.lenses`): the logit lens (the default, the paper's)
or a learned lens (tuned, Jacobian) that first maps each block's output into the last block's
basis. A learned lens is trained on block outputs, so it reads `resid_post` only. The result
records the lens (`TrajectoryResult.lens`, a `lens` column in the tidy table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from idiom_lens.analyses.memorization import MemorizationRecord, MemorizationResult, records_from_batch
from idiom_lens.analyses.saved import Saved, SavedTables, descriptor_path
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.lenses.lens import Lens
from idiom_lens.models.forward import iterate_forward, tokenize_probes
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.readout import Readout, read_out, release_workspace
from idiom_lens.models.selfcheck import check_close, plain_last_logits
from idiom_lens.models.tokenization import ProbeTokens
from idiom_lens.models.vocab import mask_logits, valid_mask

TRAJECTORY_SITES = ("resid_post", "resid_mid", "attn_out", "mlp_out")
_HOOK = {
    "resid_post": "blocks.{}.hook_resid_post",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
}
METRICS = ("pred_rank", "pred_prob", "target_rank", "target_prob", "entropy", "top_id")


@dataclass(frozen=True)
class TrajectoryResult(Saved):
    """Logit-lens statistics [probe, site, layer] plus the memorization of each probe.

    Saved (`save`/`load`) as `trajectory.parquet` (`to_dataframe()`), `trajectory_memorization.parquet`
    and a descriptor holding the memorization's settings, so a loaded result carries them.
    """

    memorization: MemorizationResult
    sites: tuple[str, ...]
    pred_rank: Int[np.ndarray, "probe site layer"]
    pred_prob: Float[np.ndarray, "probe site layer"]
    target_rank: Int[np.ndarray, "probe site layer"]
    target_prob: Float[np.ndarray, "probe site layer"]
    entropy: Float[np.ndarray, "probe site layer"]
    top_id: Int[np.ndarray, "probe site layer"]
    lens: dict[str, Any] = field(default_factory=lambda: {"kind": "logit"})  # `Lens.describe()` of the read-out

    @property
    def lens_kind(self) -> str:
        return str(self.lens.get("kind", "logit"))

    @property
    def n_layers(self) -> int:
        return int(self.pred_rank.shape[2])

    @property
    def settings(self) -> dict[str, Any]:
        return self.memorization.settings

    def site(self, name: str) -> int:
        if name not in self.sites:
            raise InputError(f"site {name!r} was not computed; this result has {list(self.sites)}")
        return self.sites.index(name)

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy: one row per (probe, site, layer) with the probe's kind, group and memorized flag."""
        mem = self.memorization.to_dataframe()
        n_probe, n_site, n_layer = self.pred_rank.shape
        idx = np.indices((n_probe, n_site, n_layer)).reshape(3, -1)
        frame = pd.DataFrame(
            {
                "probe_id": mem["probe_id"].to_numpy()[idx[0]],
                "kind": mem["kind"].to_numpy()[idx[0]],
                "group": mem["group"].to_numpy()[idx[0]],
                "memorized": mem["memorized"].to_numpy()[idx[0]],
                "hard_to_guess": mem["hard_to_guess"].to_numpy()[idx[0]],
                "site": np.asarray(self.sites, dtype=object)[idx[1]],
                "layer": idx[2],
                "lens": self.lens_kind,
            }
        )
        for metric in METRICS:
            frame[metric] = getattr(self, metric).reshape(-1)
        return frame

    @staticmethod
    def from_dataframe(
        frame: pd.DataFrame, memorization: MemorizationResult, *, lens: dict[str, Any] | None = None
    ) -> TrajectoryResult:
        """Rebuild a result from `to_dataframe()` output (e.g. a parquet file) and its memorization."""
        ids = [r.probe_id for r in memorization.records]
        sites = tuple(dict.fromkeys(frame["site"]))
        n_layers = int(frame["layer"].max()) + 1
        order = {pid: i for i, pid in enumerate(ids)}
        frame = frame.assign(
            _p=frame["probe_id"].map(order), _s=frame["site"].map({s: i for i, s in enumerate(sites)})
        ).sort_values(["_p", "_s", "layer"])
        if frame["_p"].isna().any() or len(frame) != len(ids) * len(sites) * n_layers:
            raise InputError("trajectory table does not match its memorization records")
        shape = (len(ids), len(sites), n_layers)
        arrays = {m: frame[m].to_numpy().reshape(shape) for m in METRICS}
        return TrajectoryResult(memorization=memorization, sites=sites, lens=lens or {"kind": "logit"}, **arrays)

    @staticmethod
    def join_parts(parts: Sequence[TrajectoryResult]) -> TrajectoryResult:
        """Parts of one run (disjoint probes, the same model, sites and lens) as one result."""
        if not parts:
            raise InputError("no trajectory results to join")
        first = parts[0]
        if any(p.sites != first.sites or p.settings != first.settings or p.lens != first.lens for p in parts):
            raise InputError("trajectory results differ in sites, model settings or lens")
        mem = MemorizationResult(
            records=tuple(r for p in parts for r in p.memorization.records), settings=first.settings
        )
        arrays = {m: np.concatenate([getattr(p, m) for p in parts]) for m in METRICS}
        return TrajectoryResult(memorization=mem, sites=first.sites, lens=first.lens, **arrays)

    default_name = "trajectory"

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        return {"": self.to_dataframe(), "memorization": self.memorization.to_dataframe()}

    def saved_meta(self) -> dict[str, Any]:
        return {"lens": self.lens}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> TrajectoryResult:
        memorization = MemorizationResult.from_dataframe(saved.tables["memorization"], saved.settings)
        return cls.from_dataframe(saved.tables[""], memorization, lens=saved.meta.get("lens"))


def layer_trajectory(
    model: LoadedModel,
    probes: Sequence[Probe],
    *,
    sites: Sequence[str] = TRAJECTORY_SITES,
    batch_size: int = 16,
    lens: Lens | None = None,
    progress: bool = False,
) -> TrajectoryResult:
    """Trajectory of every probe read through `lens` (default: the logit lens); batched, and
    independent of batch size and padding.

    Raises `InputError` for no probes, an unknown site, a lens of another model, or a learned lens
    with a site other than `resid_post`; `FastPathError` when the batched forward or read-out
    disagrees with a full forward.
    """
    probes = list(probes)
    if not probes:
        raise InputError("no probes to analyse")
    unknown = [s for s in sites if s not in _HOOK]
    if unknown or not sites:
        raise InputError(f"unknown sites {unknown or '(none given)'}: expected some of {list(TRAJECTORY_SITES)}")
    sites = tuple(sites)
    if model.masked and (sites != ("resid_post",) or (lens is not None and lens.kind != "logit")):
        raise InputError(f"{model.spec!r} is a masked LM: its trajectory reads block outputs (resid_post) through "
                         "its MLM head, the logit lens (BERT normalizes after each sublayer, so no other site is a "
                         f"point of a normalized residual stream), not sites {list(sites)}"
                         + (f" with a {lens.kind} lens" if lens is not None and lens.kind != "logit" else ""))
    if lens is not None:
        lens.check_model(model)
        if lens.kind != "logit" and sites != ("resid_post",):
            raise InputError(f"the {lens.kind} lens reads block outputs (resid_post) only, not {list(sites)}: "
                             "use --sites resid_post")
    n_layers = model.n_layers
    hook_names = [_HOOK[s].format(layer) for s in sites for layer in range(n_layers)]
    probe_tokens = tokenize_probes(model, probes)

    shape = (len(probes), len(sites), n_layers)
    out = {m: np.zeros(shape, dtype=np.int64 if m.endswith(("rank", "id")) else np.float32) for m in METRICS}
    records: list[MemorizationRecord | None] = [None] * len(probes)
    first_batch = True
    for batch in iterate_forward(
        model, probe_tokens, hook_names=hook_names, batch_size=batch_size, progress=progress,
        desc="trajectory",
    ):
        batch_records = records_from_batch(model, probes, probe_tokens, batch)
        n = len(batch.indices)
        # [site*layer, batch, d_model] -> rows ordered (probe, site, layer)
        captured = [batch.captured[h] for h in hook_names]
        if lens is not None and lens.kind != "logit":  # sites == ("resid_post",): hook i is layer i
            captured = [lens.translate(v, layer) for layer, v in enumerate(captured)]
        stacked = torch.stack(captured).transpose(0, 1)
        vectors = stacked.reshape(n * len(hook_names), model.d_model)
        tracked = torch.tensor([[r.pred_id, r.target_id] for r in batch_records])
        tracked = tracked.repeat_interleave(len(hook_names), dim=0)
        ro = read_out(model, vectors, tracked)
        per_probe = (n, len(sites), n_layers)
        values = {
            "pred_rank": ro.rank[:, 0],
            "pred_prob": ro.logprob[:, 0].exp(),
            "target_rank": ro.rank[:, 1],
            "target_prob": ro.logprob[:, 1].exp(),
            "entropy": ro.entropy,
            "top_id": ro.top_id,
        }
        if first_batch and "resid_post" in sites:
            _check_last_layer(model, probe_tokens[batch.indices[0]], batch_records[0], ro,
                              row=sites.index("resid_post") * n_layers + n_layers - 1,
                              probe=probes[batch.indices[0]].id)
        first_batch = False
        for metric, value in values.items():
            out[metric][batch.indices] = value.reshape(per_probe).numpy()
        for index, record in zip(batch.indices, batch_records):
            records[index] = record
    release_workspace()
    memorization = MemorizationResult(records=tuple(records), settings=model.settings())  # type: ignore[arg-type]
    return TrajectoryResult(memorization=memorization, sites=sites,
                            lens=(lens.describe() if lens else {"kind": "logit"}), **out)


def _check_last_layer(
    model: LoadedModel, toks: ProbeTokens, record: MemorizationRecord, ro: Readout, *, row: int, probe: str
) -> None:
    """Self-check of the read-out kernel (buffers, chunking, fused bias): the last layer's read of
    the first probe must give a plain full forward's log-probabilities of the predicted and the
    target token (`selfcheck.FastPathError` otherwise)."""
    plain = mask_logits(plain_last_logits(model, toks.prompt_ids, toks.suffix_ids), valid_mask(model)).log_softmax(-1)
    expected = plain[[record.pred_id, record.target_id]]
    check_close(ro.logprob[row], expected, what="trajectory read-out (last layer)", probe=probe)


def save_trajectory(result: TrajectoryResult, out_dir: str | Path, *, stem: str = "trajectory") -> list[Path]:
    """`result.save(out_dir, name=stem)`: `<stem>.parquet` (tidy trajectory), `<stem>_memorization.parquet`
    and the descriptor `<stem>.result.json`, atomically (kept for existing callers)."""
    return result.save(out_dir, name=stem)


def load_trajectory(out_dir: str | Path, *, stem: str = "trajectory", settings: dict | None = None) -> TrajectoryResult:
    """`TrajectoryResult.load(out_dir, name=stem)`, for existing callers.

    `settings`, when given, replaces the saved settings (the study joins reused parts with parts
    computed now, under the current model's settings, as it always did). A folder written before
    results had descriptors (both tables, no `<stem>.result.json`) is read from its tables, with
    `settings` or {} as its settings, so that earlier runs still resume.
    """
    out_dir = Path(out_dir)
    legacy = (out_dir / f"{stem}.parquet", out_dir / f"{stem}_memorization.parquet")
    if not descriptor_path(out_dir, stem).is_file() and all(p.is_file() for p in legacy):
        memorization = MemorizationResult.from_dataframe(pd.read_parquet(legacy[1]), settings or {})
        return TrajectoryResult.from_dataframe(pd.read_parquet(legacy[0]), memorization)
    result = TrajectoryResult.load(out_dir, name=stem)
    if settings is None:
        return result
    return replace(result, memorization=replace(result.memorization, settings=settings))
