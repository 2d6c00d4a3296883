"""The model check of the implanted idioms: is a new idiom really new to the model?

An idiom implanted by fine-tuning is a ground truth for localizers only if the unmodified model
does not already predict its target (method.md section 7). `base_ranks` gives the target's rank
at the end of the prompt, 1-based, over real vocabulary tokens, exactly as memorization scores it
(`idiom_lens.analyses.memorization`: rank 1 = the greedy prediction, i.e. memorized);
`build_implanted` keeps the seeded candidates of `idiom_lens.datasets.implanted` whose rank is at
least `min_rank` (default 11: not in the top 10) and returns the records of `implanted.jsonl`.
It lives here, not with the candidates, because it needs a model (the datasets floor has none).

    from idiom_lens.models.loading import load_model
    from idiom_lens.analyses.implant_check import build_implanted
    from idiom_lens.datasets.implanted import write_implanted

    records = build_implanted(load_model("gemma-3-270m"))   # 120 idioms, seed 0, ranks > 10
    write_implanted(records, "some/folder")                  # what `idiom-lens data build --implanted` does
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import Any

from idiom_lens.analyses.memorization import score_memorization
from idiom_lens.datasets.build import compositionality_ref
from idiom_lens.datasets.flags import CompositionalityRef
from idiom_lens.datasets.implanted import MIN_RANK, SEED, SIZE, candidate_stream, implanted_record
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.loading import LoadedModel


def base_ranks(model: LoadedModel, probes: Sequence[Probe], *, batch_size: int = 1) -> list[int]:
    """Per probe (in order), the 1-based rank of its target token after the prompt under `model`:
    `MemorizationRecord.target_rank + 1` (tokens with a strictly higher logit, plus one).

    Each probe runs alone by default (`batch_size=1`), so a rank is the probe's own and a recount
    of any subset gives it exactly: among 262,144 tokens a rank in the thousands has neighbours
    whose logits differ by float noise, and batching with other prompts moved one of 60 ranks by
    one (4473 vs 4474 at batch size 16, Gemma 3 270M on CPU).
    """
    if not probes:
        return []
    result = score_memorization(model, list(probes), batch_size=batch_size)
    return [record.target_rank + 1 for record in result.records]


def single_token_targets(model: LoadedModel, probes: Sequence[Probe]) -> list[bool]:
    """Per probe, whether its target word is one token of the model's tokenizer (its first
    sub-word token is the whole word), so recalling the target is recalling that token."""
    return [len(tokens.target_ids) == 1 for tokens in tokenize_probes(model, probes)]


def build_implanted(
    model: LoadedModel,
    *,
    n: int = SIZE,
    seed: int = SEED,
    min_rank: int = MIN_RANK,
    single_token: bool = True,
    ref: CompositionalityRef | None = None,
) -> list[dict[str, Any]]:
    """The records of `n` implanted idioms of `seed`, each with `base_rank >= min_rank` under `model`.

    Candidates are taken in seeded order (`candidate_stream(seed)`), `n` at a time: those whose
    target is not a single token are passed over (unless `single_token=False`), the others are
    ranked (`base_ranks`, each probe alone) and kept while their rank is at least `min_rank`,
    until `n` are kept; so the result does not depend on how the stream is cut. Records
    are numbered `implant-000`... in that order (`datasets.implanted.implanted_record`; `ref`, the
    flags' reference tables, is built when not given). Raises `InputError` for a bad `n` or
    `min_rank`, or when the candidates run out before `n` pass.
    """
    for name, value in (("n", n), ("min_rank", min_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    stream = candidate_stream(seed)
    kept: list[tuple[Probe, int]] = []
    seen = 0
    while len(kept) < n:
        chunk = list(islice(stream, n))
        if not chunk:
            raise InputError(f"only {len(kept)} of {seen} candidates of seed {seed} have a target ranked "
                             f"{min_rank} or worse on {model.spec} (single-token targets: {single_token}); "
                             f"asked for {n}")
        seen += len(chunk)
        if single_token:
            chunk = [p for p, single in zip(chunk, single_token_targets(model, chunk)) if single]
        for probe, rank in zip(chunk, base_ranks(model, chunk)):
            if rank >= min_rank and len(kept) < n:
                kept.append((probe, rank))
    ref = ref or compositionality_ref()
    return [implanted_record(probe, index=i, base_rank=rank, model_spec=model.spec, ref=ref)
            for i, (probe, rank) in enumerate(kept)]
