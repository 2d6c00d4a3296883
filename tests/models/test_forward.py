"""`iterate_forward`: the read positions only, against every position and a plain forward per probe."""

from __future__ import annotations

import pytest
import torch

from idiom_lens.errors import InputError
from idiom_lens.models.forward import iterate_forward, tokenize_probes
from idiom_lens.models.vocab import mask_logits, valid_mask


@pytest.mark.parametrize("include_target", [True, False])
def test_read_positions_equal_every_position_and_a_plain_forward(tiny_model, probes, include_target):
    """read="target" unembeds the last prompt token and the target's tokens after it: the same
    logits as read="all" at those positions and as one unpadded forward of each probe alone."""
    model = tiny_model
    probe_tokens = tokenize_probes(model, probes)
    valid = valid_mask(model)
    read = list(iterate_forward(model, probe_tokens, batch_size=4, include_target=include_target,
                                hook_names=["unembed.hook_out", "blocks.0.hook_resid_post"]))
    every = list(iterate_forward(model, probe_tokens, batch_size=4, include_target=include_target, read="all",
                                 hook_names=["unembed.hook_out", "blocks.0.hook_resid_post"]))
    checked = 0
    for fast, slow in zip(read, every):
        assert fast.indices == slow.indices and (fast.last == 0).all()
        for row, index in enumerate(fast.indices):
            toks = probe_tokens[index]
            ids = list(toks.prompt_ids) + (list(toks.target_ids) if include_target else [])
            with torch.no_grad():
                plain = mask_logits(model.bridge(torch.tensor([ids]))[0], valid)
            last = len(toks.prompt_ids) - 1
            n = len(toks.target_ids) if include_target else 1
            for j in range(n):
                assert int(fast.positions[row, j]) == last + j
                torch.testing.assert_close(fast.logits[row, j], slow.logits[row, last + j], rtol=0, atol=1e-5)
                torch.testing.assert_close(fast.logits[row, j], plain[last + j], rtol=1e-4, atol=1e-4)
                checked += 1
            for name in ("unembed.hook_out", "blocks.0.hook_resid_post"):  # captured at the last prompt token
                torch.testing.assert_close(fast.captured[name][row], slow.captured[name][row], rtol=0, atol=1e-5)
    assert checked >= len(probes)


def test_read_is_checked(tiny_model, probes):
    with pytest.raises(InputError, match="read must be 'target' or 'all'"):
        next(iterate_forward(tiny_model, tokenize_probes(tiny_model, probes), read="some"))
