"""Direct logit attribution on a BERT masked LM (`attribution_post_ln`), against the slow, obvious
computation: a plain Hugging Face `BertForMaskedLM` in which every LayerNorm's scale and the MLM
head's GELU gate are frozen at the clean run, and every sublayer's output is frozen too, so that
removing one piece at the mask changes the logit by its direct effect alone."""

from __future__ import annotations

import pytest
import torch

from idiom_lens.analyses.attribution import attribute_probe, attribute_probes
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes

PROBES = [
    Probe(id="a", prompt="the cat sat on the", target="mat", kind="idiom"),
    Probe(id="b", prompt="once in a blue", target="moon", kind="idiom"),
    Probe(id="c", prompt="a dog ran", target="home", kind="text"),
]


@pytest.fixture(scope="module")
def result(bert):
    return attribute_probes(bert, PROBES, batch_size=2, top_neurons=5)


class FrozenBert:
    """`hf_bert` with its norms, the head's gate and (all but one) sublayers' outputs frozen at the
    clean run of `input_ids`; `logits(change)` runs it with `change` (a hook installer) applied."""

    def __init__(self, hf_bert, input_ids: list[int]):
        self.hf, self.ids = hf_bert, torch.tensor([input_ids])
        self.norms = [m for m in hf_bert.modules() if isinstance(m, torch.nn.LayerNorm)]
        self.sublayers = [m for layer in hf_bert.bert.encoder.layer for m in (layer.attention.output.dense,
                                                                               layer.output.dense)]
        self.act = hf_bert.cls.predictions.transform.transform_act_fn
        self.scales, self.outputs, self.gate = {}, {}, None
        handles = [n.register_forward_hook(self._record_scale) for n in self.norms]
        handles += [s.register_forward_hook(self._record_output) for s in self.sublayers]
        handles.append(self.act.register_forward_hook(self._record_gate))
        self.clean = self._run(handles)

    def _record_scale(self, module, args, out):
        x = args[0]
        self.scales[module] = (x.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()

    def _record_output(self, module, args, out):
        self.outputs[module] = out.detach().clone()

    def _record_gate(self, module, args, out):
        self.gate = out / args[0]

    def _run(self, handles) -> torch.Tensor:
        try:
            with torch.no_grad():
                return self.hf(self.ids).logits[0].double()
        finally:
            for h in handles:
                h.remove()

    def logits(self, *, free=None, change=None) -> torch.Tensor:
        """Logits with every norm and the gate frozen, every sublayer's output frozen except `free`,
        and `change(hf)` returning extra hook handles."""
        def norm(module, args, out):
            x = args[0]
            return module.weight * (x - x.mean(-1, keepdim=True)) / self.scales[module] + module.bias

        handles = [n.register_forward_hook(norm) for n in self.norms]
        handles += [s.register_forward_hook(lambda m, a, o: self.outputs[m]) for s in self.sublayers if s is not free]
        handles.append(self.act.register_forward_hook(lambda m, a, o: self.gate * a[0]))
        handles += list(change(self.hf)) if change else []
        return self._run(handles)


def _direct_effect(frozen: FrozenBert, mask: int, pred: int, other: int, **kw) -> torch.Tensor:
    """(logit, logit_diff) of the frozen clean run minus the run with a piece removed."""
    before, after = frozen.logits(), frozen.logits(**kw)
    read = lambda x: torch.stack([x[mask, pred], x[mask, pred] - x[mask, other]])  # noqa: E731
    return read(before) - read(after)


def test_the_pieces_sum_to_the_mlm_logit(bert, hf_bert, result):
    for probe, toks in zip(result.probes, tokenize_probes(bert, PROBES)):
        with torch.no_grad():
            logits = hf_bert(torch.tensor([toks.input_ids])).logits[0, len(toks.prompt_ids) - 1]
        assert probe.pred_id == int(logits.argmax())
        expected = torch.stack([logits[probe.pred_id], logits[probe.pred_id] - logits[probe.other_id]])
        torch.testing.assert_close(probe.reconstructed(), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(probe.heads.sum(1) + probe.attn_bias, probe.attn, atol=1e-5, rtol=1e-5)
    assert max(result.checks.values()) < 1e-4


def test_the_frozen_network_reproduces_the_clean_run(bert, hf_bert):
    toks = tokenize_probes(bert, PROBES[:1])[0]
    frozen = FrozenBert(hf_bert, list(toks.input_ids))
    torch.testing.assert_close(frozen.logits(), frozen.clean, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_neurons_heads_and_the_embedding_are_their_direct_effects(bert, hf_bert, result, index):
    """Each piece equals the logit lost when it alone is removed at the mask of the frozen network."""
    probe, toks = result.probes[index], tokenize_probes(bert, PROBES)[index]
    mask = len(toks.prompt_ids) - 1
    frozen = FrozenBert(hf_bert, list(toks.input_ids))
    layers = hf_bert.bert.encoder.layer
    effect = lambda **kw: _direct_effect(frozen, mask, probe.pred_id, probe.other_id, **kw)  # noqa: E731
    d_head = hf_bert.config.hidden_size // hf_bert.config.num_attention_heads

    for neuron in probe.top_neurons[:3]:
        def zero_neuron(hf, n=neuron):
            def hook(module, args, out):
                out = out.clone()
                out[0, mask, n.neuron] = 0.0
                return out
            return [hf.bert.encoder.layer[n.layer].intermediate.register_forward_hook(hook)]

        got = effect(free=layers[neuron.layer].output.dense, change=zero_neuron)
        torch.testing.assert_close(got.float(), torch.tensor([neuron.contribution, neuron.contribution_diff]),
                                   atol=1e-4, rtol=1e-4)

    for layer, head in [(0, 1), (2, 0)]:
        def zero_head(hf, layer=layer, head=head):
            def hook(module, args):
                z = args[0].clone()
                z[0, mask, head * d_head:(head + 1) * d_head] = 0.0
                return (z,)
            return [hf.bert.encoder.layer[layer].attention.output.dense.register_forward_pre_hook(hook)]

        got = effect(free=layers[layer].attention.output.dense, change=zero_head)
        torch.testing.assert_close(got.float(), probe.heads[layer, head], atol=1e-4, rtol=1e-4)

    def zero_embedding(hf):
        def hook(module, args, out):
            out = out.clone()
            out[0, mask] = 0.0
            return out
        return [hf.bert.embeddings.register_forward_hook(hook)]

    torch.testing.assert_close(effect(change=zero_embedding).float(), probe.embed, atol=1e-4, rtol=1e-4)


def test_batched_equals_one_at_a_time(bert, result):
    for probe, single in zip(result.probes, (attribute_probes(bert, [p], batch_size=1).probes[0] for p in PROBES)):
        torch.testing.assert_close(probe.mlp, single.mlp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probe.heads, single.heads, atol=1e-5, rtol=1e-5)


def test_a_masked_lm_needs_the_last_word_and_lists_real_tokens(bert, result):
    with pytest.raises(InputError, match="give `target`"):
        attribute_probe(bert, "once in a blue")
    one = attribute_probe(bert, "once in a blue", "moon")
    assert one.pred_id == result.probes[1].pred_id
    special = set(bert.tokenizer.all_special_tokens)
    assert all(t not in special for n in result.probes[0].top_neurons for t in n.promoted)
    assert result.settings["position"] == "the mask"
