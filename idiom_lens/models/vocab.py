"""Which token ids are real vocabulary: every prediction, rank and probability ranges over them.

A model's vocabulary holds tokens that are not text: Gemma 3 has 6,249 special and unused tokens
(`<unused0>` ..., `<eos>`) and, among its 135 other added tokens, control markers its tokenizer
does not mark special (`<start_of_image>`, `<end_of_image>`, `[multimodal]`). Left in, they are
predicted for dozens of bundled probes, which then sit among the non-memorized curves for a
reason that has nothing to do with recall. So, as method.md section 3 asks, every non-text token
is masked out of the argmax and of every read-out: its logit is set to the lowest float before
ranking and softmax (the distribution is renormalised over text tokens).

The rule (`mask_reasons` gives each masked id its reason):
1. `special`: the tokenizer says so (`all_special_ids`, or an added token marked special);
2. `placeholder`: any token, added or not, written as a reserved slot: `<unusedN>`, `[unusedN]`
   (BERT) or `<|reserved_special_token_N|>` (Llama 3);
3. `control`: an added token written as one bracketed word, `<name>`, `</name>`, `<|name|>` or
   `[name]`, unless it is an HTML element's tag (`<table>`, `</b>`, `<h1>`: text on the web,
   kept predictable; Gemma's `<bbox>` is no HTML element and is masked);
4. `beyond tokenizer`: ids the model has and the tokenizer does not.
Added tokens that are whitespace runs (Gemma's newlines and tabs) or plain words stay text.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

MASK_RULE = "special, placeholder and control tokens (idiom_lens.models.vocab, rule 2)"

_PLACEHOLDER = re.compile(r"<unused\d+>|\[unused\d+\]|<\|reserved_special_token_\d+\|>")
_BRACKETED = re.compile(r"</?([^<>\s/]+)>|<\|[^<>|\s]+\|>|\[[^\[\]\s]+\]")
_HTML_TAG = re.compile(r"</?([a-z][a-z0-9]*)>")
# The elements of the HTML Living Standard (https://html.spec.whatwg.org/#elements-3) and the
# common obsolete ones (b, i, u, s, big, center, font, tt ...): their tags are text on the web.
# Left out: audio and video, which multimodal tokenizers use as placeholders (`<audio>`).
HTML_ELEMENTS = frozenset("""
a abbr acronym address area article aside b base bdi bdo big blockquote body br button
canvas caption center cite code col colgroup data datalist dd del details dfn dialog dir div dl dt
em embed fieldset figcaption figure font footer form frame frameset h1 h2 h3 h4 h5 h6 head header
hgroup hr html i iframe img input ins kbd label legend li link main map mark menu meta meter nav
noscript object ol optgroup option output p param picture pre progress q rp rt ruby s samp script
search section select slot small source span strike strong style sub summary sup table tbody td
template textarea tfoot th thead time title tr track tt u ul var wbr
""".split())
_MASKS: weakref.WeakKeyDictionary[object, Tensor] = weakref.WeakKeyDictionary()


def is_control_marker(content: str) -> bool:
    """An added token written as one bracketed word that is not an HTML element's tag."""
    if not _BRACKETED.fullmatch(content):
        return False
    html = _HTML_TAG.fullmatch(content)
    return not (html and html.group(1) in HTML_ELEMENTS)


def mask_reasons(tokenizer: Any, d_vocab: int) -> dict[int, str]:
    """Every id of a `d_vocab`-token model that is not text, with the rule that masks it
    (`special`, `placeholder`, `control`, `beyond tokenizer`; see the module docstring)."""
    reasons: dict[int, str] = {}
    n_tokens = min(len(tokenizer), d_vocab)
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(n_tokens)))):
        if isinstance(token, str) and _PLACEHOLDER.fullmatch(token):
            reasons[i] = "placeholder"
    for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = str(getattr(token, "content", token))
        if getattr(token, "special", False):
            reasons[int(i)] = "special"
        elif int(i) not in reasons and is_control_marker(content):
            reasons[int(i)] = "control"
    for i in getattr(tokenizer, "all_special_ids", []):
        reasons[int(i)] = "special"
    for i in range(len(tokenizer), d_vocab):
        reasons[i] = "beyond tokenizer"
    return {i: reasons[i] for i in sorted(reasons) if 0 <= i < d_vocab}


def masked_token_ids(tokenizer: Any, d_vocab: int) -> list[int]:
    """Ids that are not text (`mask_reasons`), sorted."""
    return list(mask_reasons(tokenizer, d_vocab))


def masked_tokens_table(tokenizer: Any, d_vocab: int) -> pd.DataFrame:
    """One row per masked id: `token_id`, `token` (as the tokenizer writes it) and `reason`."""
    reasons = mask_reasons(tokenizer, d_vocab)
    ids = list(reasons)
    known = [i for i in ids if i < len(tokenizer)]
    tokens = dict(zip(known, tokenizer.convert_ids_to_tokens(known)))
    return pd.DataFrame({"token_id": ids, "token": [tokens.get(i, "") for i in ids],
                         "reason": [reasons[i] for i in ids]})


def valid_mask(model: Any) -> Bool[Tensor, " d_vocab"]:
    """True for real vocabulary tokens of `model` (a `LoadedModel`), computed once per model."""
    bridge = model.bridge
    if bridge not in _MASKS:
        d_vocab = int(bridge.cfg.d_vocab)
        mask = torch.ones(d_vocab, dtype=torch.bool)
        mask[masked_token_ids(model.tokenizer, d_vocab)] = False
        if not mask.any():
            raise ValueError(f"{model.spec}: every token id is special; nothing to predict")
        _MASKS[bridge] = mask.to(model.device)
    return _MASKS[bridge]


def mask_logits(logits: Float[Tensor, "*batch d_vocab"], valid: Bool[Tensor, " d_vocab"]) -> Tensor:
    """`logits` with masked tokens at the lowest float: never the argmax, never outrank a real token,
    probability 0 after softmax (finite, so that p x logit stays 0 in the entropy)."""
    return logits.masked_fill(~valid.to(logits.device), torch.finfo(logits.dtype).min)


def mask_summary(model: Any) -> dict[str, Any]:
    """What a result records about the mask."""
    valid = valid_mask(model)
    return {"masked_tokens": MASK_RULE, "n_masked_tokens": int((~valid).sum())}
