"""Trained lenses in the cache, keyed by model, lens kind, corpus and settings: train once, reuse.

`obtain_lens(model, "tuned")` returns the cached lens for these settings or trains it (with a
progress bar; an interrupted training resumes from its work folder) and stores it under
`<cache>/lenses/<model>/<kind>-<key>.pt` beside its held-out KL table (`.heldout.parquet`) and a
readable description (`.json`). The held-out KL is measured on a seeded selection of about
`heldout_tokens` positions of the corpus's held-out pool (`lenses.corpus`: lee.cor and the
held-out model samples by default); the lens's settings say what it was measured on
(`heldout_pool`: the pool's sentences per origin; `heldout_used`: the selection's sentences per
origin and its token count). A tuned lens also records its training curve (`train.training_curve`;
a lens cached before curves were recorded loads as before, with an empty curve). The key digests
the model's settings, the kind, the corpus, every training setting and the probe prompts kept out
of the corpus, so a changed setting trains anew.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from idiom_lens.errors import InputError
from idiom_lens.io import key_digest, write_parquet
from idiom_lens.lenses.corpus import build_corpus, check_disjoint, heldout_counts, tokenize_sentences
from idiom_lens.lenses.lens import KINDS, Lens, logit_lens
from idiom_lens.lenses.settings import LensSettings
from idiom_lens.lenses.train import collect_residuals, fit_jacobian_lens, heldout_kl, train_tuned_lens
from idiom_lens.locks import lock_file
from idiom_lens.models.loading import cache_dir

FORMAT = 1


def _model_key(model: Any) -> dict[str, Any]:
    settings = dict(model.settings())
    settings.pop("versions", None)
    settings.pop("device", None)
    settings.pop("model_spec", None)
    return settings


def lens_key(model: Any, kind: str, settings: LensSettings, prompts: Sequence[str]) -> dict[str, Any]:
    used = dataclasses.asdict(settings)
    if kind == "tuned":
        for name in ("jacobian_prompts", "jacobian_slice", "jacobian_skip_first"):
            used.pop(name)
    else:
        for name in ("train_tokens", "steps", "batch_tokens", "lr"):
            used.pop(name)
    return {"format": FORMAT, "model": _model_key(model), "kind": kind, "settings": used,
            "excluded_prompts": key_digest(sorted(set(prompts)))}


def lens_path(model: Any, kind: str, settings: LensSettings, prompts: Sequence[str]) -> Path:
    digest = key_digest(lens_key(model, kind, settings, prompts))[:12]
    return cache_dir() / "lenses" / model.name / f"{kind}-{digest}.pt"


def bundled_prompts() -> list[str]:
    """Prompts of every bundled probe set (idioms, text, facts): kept out of every lens corpus."""
    from idiom_lens.datasets import load_probes

    return [p.prompt for name in ("idioms", "text", "facts") for p in load_probes(name)]


def _take(sequences: list[list[int]], n_tokens: int, seed: int) -> list[list[int]]:
    """A seeded selection of sequences holding about `n_tokens` non-BOS positions."""
    return [sequences[i] for i in _take_indices([len(s) for s in sequences], n_tokens, seed)]


def _take_indices(lengths: Sequence[int], n_tokens: int, seed: int) -> list[int]:
    """The indices `_take` selects from sequences of these lengths (in the order taken)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for i in order:
        if total >= n_tokens:
            break
        out.append(i)
        total += lengths[i] - 1
    return out


def obtain_lens(
    model: Any,
    kind: str,
    *,
    settings: LensSettings | None = None,
    prompts: Sequence[str] | None = None,
    train: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Lens:
    """The lens of `kind` for `model`: the logit lens, or a cached learned lens (trained first when
    missing and `train`; `InputError` when missing and not `train`). `prompts` are kept out of the
    corpus (default: every bundled probe set's prompts)."""
    if kind not in KINDS:
        raise InputError(f"--lens {kind!r} is unknown: expected one of {list(KINDS)} or a lens file (.pt)")
    if kind == "logit":
        return logit_lens(model)
    settings = settings or LensSettings()
    prompts = bundled_prompts() if prompts is None else list(prompts)
    path = lens_path(model, kind, settings, prompts)
    if path.is_file():
        lens = Lens.load(path)
        lens.check_model(model)
        return lens
    if not train:
        raise InputError(f"no {kind} lens for {model.name} with these settings in the cache ({path}): "
                         f"train it with `idiom-lens lens train --model {model.spec} --kind {kind}`")
    return train_lens(model, kind, settings=settings, prompts=prompts, progress=progress, log=log)


def train_lens(
    model: Any,
    kind: str,
    *,
    settings: LensSettings,
    prompts: Sequence[str],
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Lens:
    """Train a `kind` lens for `model`, resumably, and store it with its held-out KL in the cache.
    Holds the cache entry's lock meanwhile (`FolderInUse` when another process trains it); a lens
    another process finished in the meantime is loaded, not trained again."""
    path = lens_path(model, kind, settings, prompts)
    with lock_file(path.with_suffix(".lock"), what=f"the {kind} lens cache entry {path}", log=log):
        if path.is_file():
            lens = Lens.load(path)
            lens.check_model(model)
            return lens
        return _train_lens(model, kind, path, settings=settings, prompts=prompts, progress=progress, log=log)


def _train_lens(model: Any, kind: str, path: Path, *, settings: LensSettings, prompts: Sequence[str],
                progress: bool, log: Callable[[str], None]) -> Lens:
    work = path.with_suffix(".work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus = build_corpus(model, corpus=settings.corpus, text_file=settings.text_file, probe_prompts=prompts,
                          n_samples=settings.n_samples, seed=settings.seed)
    check_disjoint(corpus, prompts)
    log(f"{kind} lens for {model.name}: corpus {corpus.name}, {len(corpus.train)} training and "
        f"{len(corpus.heldout)} held-out sentences ({corpus.dropped} dropped: they contain a probe prompt)")
    recorded = {**dataclasses.asdict(settings), **corpus.describe()}
    if kind == "tuned":
        train_seqs = _take(tokenize_sentences(model, corpus.train, max_tokens=settings.max_tokens),
                           settings.train_tokens, settings.seed)
        residuals, _ = collect_residuals(model, train_seqs)
        log(f"  {residuals.shape[0]} training positions collected")
        lens = train_tuned_lens(model, residuals, steps=settings.steps, batch_tokens=settings.batch_tokens,
                                lr=settings.lr, seed=settings.seed, checkpoint=work / "tuned.ckpt.pt",
                                progress=progress, settings=recorded, log=log)
    else:
        rng = random.Random(settings.seed)
        order = list(corpus.train)
        rng.shuffle(order)
        long_enough = [s for s in order
                       if len(model.tokenizer(s)["input_ids"]) > settings.jacobian_skip_first + 2]
        lens = fit_jacobian_lens(model, long_enough[: settings.jacobian_prompts], corpus=corpus.name,
                                 work_dir=work, slice_size=settings.jacobian_slice,
                                 max_seq_len=settings.max_tokens, skip_first_positions=settings.jacobian_skip_first,
                                 progress=progress, settings=recorded, log=log)
    seconds = time.perf_counter() - started
    lens = dataclasses.replace(lens, settings={**lens.settings, "train_seconds": round(seconds, 1),
                                               "torch_threads": torch.get_num_threads()})
    # the held-out sentences with their origins (a sentence of under 3 tokens is left out, as in
    # `tokenize_sentences`), then the same seeded selection as ever
    origins = corpus.heldout_origins or ("unknown",) * len(corpus.heldout)
    pairs = [(ids, origin) for sentence, origin in zip(corpus.heldout, origins)
             for ids in tokenize_sentences(model, [sentence], max_tokens=settings.max_tokens)]
    chosen = _take_indices([len(ids) for ids, _ in pairs], settings.heldout_tokens, settings.seed)
    heldout_seqs = [pairs[i][0] for i in chosen]
    used = {"n_sentences": len(chosen), "n_tokens": sum(len(s) - 1 for s in heldout_seqs),
            "from": heldout_counts([pairs[i][1] for i in chosen])}
    lens = dataclasses.replace(lens, settings={**lens.settings, "heldout_used": used})
    log(f"  held-out KL on {used['n_tokens']} positions of {used['n_sentences']} sentences: "
        + ", ".join(f"{n} from {origin}" for origin, n in used["from"].items()))
    residuals, owner = collect_residuals(model, heldout_seqs)
    table = heldout_kl(model, [logit_lens(model), lens], residuals, owner, seed=settings.seed)
    write_parquet(path.with_suffix(".heldout.parquet"), table.assign(model=model.name))
    lens.save(path)  # last: a lens in the cache is a finished one
    shutil.rmtree(work, ignore_errors=True)
    log(f"  {kind} lens trained in {seconds:.0f} s -> {path}")
    return lens


def heldout_table(model: Any, kind: str, *, settings: LensSettings | None = None,
                  prompts: Sequence[str] | None = None) -> pd.DataFrame:
    """The held-out KL table stored with a cached lens (logit and `kind` rows)."""
    path = lens_path(model, kind, settings or LensSettings(), bundled_prompts() if prompts is None else prompts)
    table = path.with_suffix(".heldout.parquet")
    if not table.is_file():
        raise InputError(f"no {kind} lens for {model.name} with these settings in the cache ({path}): train it with "
                         f"`idiom-lens lens train --model {model.spec} --kind {kind}` and the same options")
    # Lenses cached before the interval columns were named kl_low / kl_high (train.heldout_kl) say low / high.
    return pd.read_parquet(table).rename(columns={"low": "kl_low", "high": "kl_high"})


def load_lens_file(model: Any, path: str | Path) -> Lens:
    """A lens from a file: ours (`Lens.save`), or a TransformerLens `JacobianLens` artifact."""
    path = Path(path)
    try:
        lens = Lens.load(path)
    except InputError:
        if not path.is_file():
            raise
        from transformer_lens.tools.analysis import JacobianLens

        try:
            tl = JacobianLens.load(str(path))
        except Exception as error:
            raise InputError(f"{path} is neither an idiom-lens lens nor a TransformerLens JacobianLens file "
                             f"({error})") from error
        if tl.d_model != model.d_model or max(tl.source_layers) >= model.n_layers - 1:
            raise InputError(f"{path}: a Jacobian lens of d_model {tl.d_model}, layers {tl.source_layers[0]}.."
                             f"{tl.source_layers[-1]}, not for {model.name}") from None
        J = torch.eye(model.d_model).repeat(model.n_layers, 1, 1)
        for layer in tl.source_layers:
            J[layer] = tl.jacobians[layer]
        lens = Lens(kind="jacobian", model_name=model.name, n_layers=model.n_layers, d_model=model.d_model,
                    translators={"J": J}, settings={"source": str(path), **{k: v for k, v in tl.metadata.items()
                                                                          if isinstance(v, (str, int, float))}})
    lens.check_model(model)
    return lens


def resolve_lens(model: Any, spec: str, **kwargs: Any) -> Lens:
    """`--lens SPEC`: a kind (logit, tuned, jacobian) from the cache, or a lens file path."""
    if spec in KINDS:
        return obtain_lens(model, spec, **kwargs)
    if spec.endswith(".pt") or Path(spec).exists():
        return load_lens_file(model, spec)
    raise InputError(f"--lens {spec!r}: expected one of {list(KINDS)} or a lens file (.pt)")
