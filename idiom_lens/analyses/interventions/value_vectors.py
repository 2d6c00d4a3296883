"""The authors' value-vector statistic: where the model's prediction ranks in the vocabulary
projection of the dominant neurons' value vectors, per layer.

Per probe and layer, the neurons are ranked as for the knockouts (clean pass, last prompt
position, `knockouts.rank_neurons`; ``rank_by="effective"``, ours, by default; the authors rank by
``"magnitude"``, |m| x ||v||). Each of the top-k value vectors (a row of W_out) is projected
onto the vocabulary (value vector @ W_U, as the authors' `get_all_projected_value_vectors` does:
no final norm) and the model's prediction's rank in it is read (0 = the token the vector promotes
most). The authors report the rank in the top-1 neuron's projection and the min / mean / max
rank over the top-k (lm_debugger_utils.py: `top_vv_stats`, `agg_rank_in_top_values_per_layer`).

Ours differ in two recorded ways besides the default ranking: predictions and ranks range over
real vocabulary tokens only (`idiom_lens.models.vocab`), and ``weights="effective"`` optionally
projects the value vector as the model reads it out (times the post-MLP norm's gain and the final
norm's gain, RMS-type norms only; the per-position RMS scales do not change a rank).
``weights="raw"`` (default) is the authors'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from idiom_lens.analyses.interventions.knockouts import RankBy, post_norm_gains, rank_neurons, rms_gain
from idiom_lens.analyses.memorization import probe_group
from idiom_lens.analyses.saved import Saved, SavedTables, joined_settings, plain
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.loading import LoadedModel, require_causal
from idiom_lens.models.vocab import mask_summary, valid_mask

Weights = Literal["raw", "effective"]


VALUE_VECTOR_KS: tuple[int, ...] = (1, 10)  # the authors' k values

@dataclass(frozen=True)
class ValueVectorRanks(Saved):
    """Per probe, layer and top-neuron rank r: the prediction's rank in that neuron's vocabulary
    projection (`ranks[p, l, r]`, 0 = promoted most), and the neuron (`neurons[p, l, r]`).

    Saved (`save`/`load`) as `value_vectors_probes.parquet` (probe_id, group, pred_id),
    `value_vectors_ranks.parquet` (one row per probe, layer and r: rank and neuron), the
    descriptor, and for readers `value_vectors.parquet` and `value_vectors_summary.parquet`.
    """

    probe_ids: tuple[str, ...]
    groups: tuple[str, ...]
    pred_ids: tuple[int, ...]
    ks: tuple[int, ...]
    ranks: Int[np.ndarray, "probe layer k_max"]
    neurons: Int[np.ndarray, "probe layer k_max"]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per probe, layer and k: the rank in the top-1 neuron's projection, and the min,
        mean and max rank over the top-k neurons' projections (the authors' columns)."""
        rows = []
        for p, pid in enumerate(self.probe_ids):
            for layer in range(self.ranks.shape[1]):
                r = self.ranks[p, layer]
                for k in self.ks:
                    rows.append({
                        "probe_id": pid, "group": self.groups[p], "pred_id": self.pred_ids[p], "layer": layer,
                        "k": k, "top1_rank": int(r[0]), "min_rank": int(r[:k].min()),
                        "mean_rank": float(r[:k].mean()), "max_rank": int(r[:k].max()),
                    })
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Per set, layer and k: n, median top-1 rank, mean of the min rank, share of probes whose
        prediction is the top token of the top-1 neuron's projection."""
        frame = self.to_dataframe()
        frame["top1_is_pred"] = frame["top1_rank"] == 0
        return (frame.groupby(["group", "layer", "k"], sort=True)
                .agg(n=("probe_id", "size"), median_top1_rank=("top1_rank", "median"),
                     mean_min_rank=("min_rank", "mean"), share_top1_is_pred=("top1_is_pred", "mean"))
                .reset_index())

    @staticmethod
    def join_parts(parts: Sequence[ValueVectorRanks]) -> ValueVectorRanks:
        """Parts of one run (disjoint probes in order, the same ks and settings) as one result."""
        if not parts:
            raise InputError("no value-vector parts to join")
        if any(tuple(p.ks) != tuple(parts[0].ks) for p in parts):
            raise InputError(f"value-vector parts have different ks: {sorted({tuple(p.ks) for p in parts})}")
        return ValueVectorRanks(
            probe_ids=tuple(i for p in parts for i in p.probe_ids), groups=tuple(g for p in parts for g in p.groups),
            pred_ids=tuple(i for p in parts for i in p.pred_ids), ks=tuple(parts[0].ks),
            ranks=np.concatenate([p.ranks for p in parts]), neurons=np.concatenate([p.neurons for p in parts]),
            settings=joined_settings(parts, what="ValueVectorRanks"),
        )

    default_name = "value_vectors"

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        p, l, r = np.indices(self.ranks.shape).reshape(3, -1)
        probes = pd.DataFrame({"probe_id": list(self.probe_ids), "group": list(self.groups),
                               "pred_id": list(self.pred_ids)}, columns=["probe_id", "group", "pred_id"])
        ranks = pd.DataFrame({"probe_id": np.asarray(self.probe_ids, dtype=object)[p], "layer": l, "r": r,
                              "rank": self.ranks.reshape(-1), "neuron": self.neurons.reshape(-1)})
        return {"probes": probes, "ranks": ranks}

    def derived_tables(self) -> dict[str, pd.DataFrame]:
        return {"": self.to_dataframe(), "summary": self.summary()}

    def saved_meta(self) -> dict[str, Any]:
        return {"ks": self.ks, "shape": [int(n) for n in self.ranks.shape],
                "ranks_dtype": self.ranks.dtype.str, "neurons_dtype": self.neurons.dtype.str}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> ValueVectorRanks:
        probes, long = saved.tables["probes"], saved.tables["ranks"]  # long: C order of [probe, layer, r]
        meta = saved.meta
        shape = tuple(meta["shape"])
        return cls(
            probe_ids=tuple(str(v) for v in probes["probe_id"]), groups=tuple(str(v) for v in probes["group"]),
            pred_ids=tuple(plain(v) for v in probes["pred_id"]), ks=tuple(meta["ks"]),
            ranks=long["rank"].to_numpy().astype(meta["ranks_dtype"]).reshape(shape),
            neurons=long["neuron"].to_numpy().astype(meta["neurons_dtype"]).reshape(shape),
            settings=saved.settings,
        )


def value_vector_ranks(
    model: LoadedModel,
    probes: Sequence[Probe],
    *,
    ks: Sequence[int] = VALUE_VECTOR_KS,
    rank_by: RankBy = "effective",
    weights: Weights = "raw",
    chunk: int = 32,
    progress: bool = False,
) -> ValueVectorRanks:
    """Rank of each probe's (masked) prediction in the vocabulary projections of its top-k neurons'
    value vectors, every layer. Each needed neuron is projected once, in GEMMs of exactly `chunk`
    rows (speed and memory only; a fixed shape, so a probe's ranks do not depend on which other
    probes share the call: parts and worker tasks give one call's ranks).

    Raises `InputError` for a k outside 1..d_mlp, unknown weights or a chunk below 1.
    """
    require_causal(model, "the value-vector statistic")
    probes = check_probes(probes)
    ks = tuple(sorted(set(int(k) for k in ks)))
    d_mlp = int(model.bridge.cfg.d_mlp)
    if not ks or ks[0] < 1 or ks[-1] > d_mlp:
        raise InputError(f"ks must be in 1..{d_mlp}, got {list(ks)}")
    if weights not in ("raw", "effective"):
        raise InputError(f"weights must be 'raw' or 'effective', got {weights!r}")
    if chunk < 1:
        raise InputError(f"chunk must be >= 1, got {chunk}")
    ranking = rank_neurons(model, probes, rank_by=rank_by)
    top = ranking.top(ks[-1]).numpy()  # [probe, layer, k_max]
    valid = valid_mask(model)
    with torch.no_grad():
        w_u = model.bridge.W_U.float()  # [d_model, d_vocab]
        w_out = model.bridge.W_out.float()  # [layer, d_mlp, d_model]
        if weights == "effective":
            gains = post_norm_gains(model)
            if gains is not None:
                w_out = w_out * gains[:, None, :]
            w_u = w_u * rms_gain(model.bridge.ln_final, model, what="final norm")[:, None]
    preds = np.array(ranking.pred_ids)
    ranks = np.zeros(top.shape, dtype=np.int64)
    # every (layer, neuron) some probe needs, projected once, in GEMMs of exactly `chunk` rows (the
    # last one zero-padded): CPU BLAS picks its kernel by the row count, and kernels round
    # differently, so a fixed shape keeps each projection, and so each probe's ranks, the same
    # whatever other probes share the call (a sweep cut into parts or worker tasks).
    needed = [(layer, int(n)) for layer in range(model.n_layers) for n in np.unique(top[:, layer])]
    starts = range(0, len(needed), chunk)
    for start in tqdm(starts, desc="value vectors", disable=not progress):
        rows = needed[start : start + chunk]
        with torch.no_grad():
            vectors = torch.zeros(chunk, w_out.shape[-1], dtype=w_out.dtype, device=w_out.device)
            vectors[: len(rows)] = w_out[[lay for lay, _ in rows], [n for _, n in rows]]
            proj = (vectors @ w_u)[: len(rows)]  # [rows, d_vocab]
            proj = proj.masked_fill(~valid, float("-inf"))
        for j, (layer, neuron) in enumerate(rows):
            where = np.argwhere(top[:, layer] == neuron)  # (probe, r) pairs using this neuron
            pred = torch.as_tensor(preds[where[:, 0]])
            count = (proj[j][None, :] > proj[j, pred][:, None]).sum(-1).numpy()
            ranks[where[:, 0], layer, where[:, 1]] = count
    tokens = tokenize_probes(model, probes)
    groups = tuple(probe_group(p.kind, int(pred) == t.target_id) for p, pred, t in zip(probes, preds, tokens))
    settings = model.settings() | mask_summary(model) | {
        "analysis": "value_vector_ranks", "ks": list(ks), "rank_by": rank_by, "weights": weights,
        "n_probes": len(probes),
        "weights_note": "value vector @ W_U (the authors')" if weights == "raw"
        else "value vector x post-MLP norm gain x final norm gain @ W_U",
    }
    return ValueVectorRanks(tuple(p.id for p in probes), groups, tuple(int(p) for p in preds), ks, ranks, top,
                            settings)
