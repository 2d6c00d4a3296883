"""Lenses: how a residual-stream vector at layer l is read as a next-token distribution.

A lens maps `resid_post` of block l into the basis of the last block's output; the model's own
final norm and unembedding then read it (`idiom_lens.models.readout`). Three kinds:
- `logit`: the identity (nostalgebraist's logit lens; the paper's read-out);
- `tuned`: one affine translator per layer, h + h A_l + b_l, trained to minimise the KL divergence
  to the model's final output (Belrose et al. 2023, "Eliciting Latent Predictions from
  Transformers with the Tuned Lens"); A = 0, b = 0 is the logit lens;
- `jacobian`: TransformerLens 4.3's `JacobianLens` (one averaged Jacobian J_l of the final block's
  output with respect to block l's output; Gurnee et al. 2026); J = I is the logit lens.
The last layer's translator is always the identity, so every lens's last layer is the model's
own output. A lens belongs to one model (name, layer count, width): `check_model` refuses others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from idiom_lens.errors import InputError
from idiom_lens.io import atomic_write, write_json

LensKind = Literal["logit", "tuned", "jacobian"]
KINDS: tuple[str, ...] = ("logit", "tuned", "jacobian")
FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class Lens:
    """A fitted lens for one model. `translators` is None for the logit lens; else, for the tuned
    lens, {"weight": [layer, d, d], "bias": [layer, d]} (the correction added to h); for the
    Jacobian lens, {"J": [layer, d, d]} (h -> h J_l^T). Row `n_layers - 1` is the identity."""

    kind: str
    model_name: str
    n_layers: int
    d_model: int
    translators: dict[str, Tensor] | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # how it was trained: corpus, steps, seed, ...

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"lens kind {self.kind!r} is unknown: expected one of {list(KINDS)}")
        if (self.translators is None) != (self.kind == "logit"):
            raise InputError(f"a {self.kind} lens {'needs' if self.kind != 'logit' else 'has no'} translators")
        expected = {"tuned": {"weight": (self.n_layers, self.d_model, self.d_model),
                              "bias": (self.n_layers, self.d_model)},
                    "jacobian": {"J": (self.n_layers, self.d_model, self.d_model)}}.get(self.kind, {})
        for name, shape in expected.items():
            got = (None if self.translators is None or name not in self.translators
                   else tuple(self.translators[name].shape))
            if got != shape:
                raise InputError(f"{self.kind} lens translator {name!r} has shape {got}, expected {shape}")

    def describe(self) -> dict[str, Any]:
        """What a result records about the lens that read it (JSON-exact)."""
        return {"kind": self.kind, "model_name": self.model_name, "n_layers": self.n_layers,
                "d_model": self.d_model, **({"settings": self.settings} if self.settings else {})}

    def check_model(self, model: Any) -> None:
        """`InputError` unless this lens was made for `model` (a `LoadedModel`): name, layers, width."""
        got = (model.name, model.n_layers, model.d_model)
        want = (self.model_name, self.n_layers, self.d_model)
        if got != want:
            raise InputError(
                f"this {self.kind} lens was trained for {self.model_name} ({self.n_layers} layers, d_model "
                f"{self.d_model}), not for {model.name} ({model.n_layers} layers, d_model {model.d_model}): "
                f"train one for this model (idiom-lens lens train --model {model.spec} --kind {self.kind})")

    def translate(self, vectors: Float[Tensor, "n d_model"], layer: int) -> Float[Tensor, "n d_model"]:
        """Block `layer`'s output vectors mapped into the final block's output basis."""
        if not 0 <= layer < self.n_layers:
            raise InputError(f"layer {layer} is outside this lens's 0..{self.n_layers - 1}")
        if self.translators is None or layer == self.n_layers - 1:
            return vectors
        if self.kind == "tuned":
            weight, bias = self.translators["weight"][layer], self.translators["bias"][layer]
            return vectors + vectors @ weight.to(vectors) + bias.to(vectors)
        return vectors @ self.translators["J"][layer].to(vectors).T

    # ---------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        """`path` (a .pt file, fp32, written atomically) plus `path.json`, a readable description."""
        path = Path(path)
        payload = {"format_version": FORMAT_VERSION, "kind": self.kind, "model_name": self.model_name,
                   "n_layers": self.n_layers, "d_model": self.d_model, "settings": json.dumps(self.settings),
                   "translators": {k: v.detach().float().cpu().contiguous()
                                   for k, v in (self.translators or {}).items()}}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        write_json(path.with_suffix(".json"), self.describe())
        return path

    @staticmethod
    def load(path: str | Path) -> Lens:
        """A lens written by `save`; `InputError` for a missing or foreign file."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no lens file at {path}: expected a .pt file written by `idiom-lens lens train`")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file
            raise InputError(f"{path} is not a lens file written by idiom-lens ({error})") from error
        if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path} is not an idiom-lens lens file of format {FORMAT_VERSION}")
        return Lens(kind=payload["kind"], model_name=payload["model_name"], n_layers=int(payload["n_layers"]),
                    d_model=int(payload["d_model"]), translators=payload["translators"] or None,
                    settings=json.loads(payload["settings"]))


def logit_lens(model: Any) -> Lens:
    """The identity lens of `model` (a `LoadedModel`)."""
    return Lens(kind="logit", model_name=model.name, n_layers=model.n_layers, d_model=model.d_model)


def identity_tuned_lens(model: Any, **settings: Any) -> Lens:
    """A tuned lens whose translators are all zero corrections, i.e. the logit lens (training starts here)."""
    n, d = model.n_layers, model.d_model
    return Lens(kind="tuned", model_name=model.name, n_layers=n, d_model=d, settings=dict(settings),
                translators={"weight": torch.zeros(n, d, d), "bias": torch.zeros(n, d)})
