"""Implanted models as stored weight deltas and loadable model specs (no training here).

An implant (`idiom_lens.models.implant`) fine-tunes one MLP layer of a base model on a probe set
and keeps only the change of the trained tensors. This module holds what loading an implanted
model needs: the options, the spec grammar, where an implant lives in the model cache, and adding
its deltas to the Hugging Face weights under a bridge. `models.loading` imports it, and it imports
neither `loading` nor `implant`, so the package's imports keep running one way
(tests/test_layers.py).

Spec grammar (parts separated by ':', in any order, each at most once; `parse_implant_spec`):

    BASE+implant:layerL[:seedS][:neurons[N]][:inputs][:target|:sequence][:set=NAME]
                 [:lr=X][:epochs=N][:stop=X][:batch=N][:preserve=X][:sentences=N]

- BASE: any base spec `load_model` takes (`gemma-3-270m`, a local directory, ...);
- layerL: the trained MLP layer (required); seedS: the seed (default 0);
- neurons / neuronsN: only N seeded-random neurons of the layer are trained (default: the whole
  layer's MLP); inputs: their input weights too; target / sequence: the training loss;
- set=NAME: the implanted probe set, a bundled name or a file (default `implanted`);
- lr, epochs, stop, batch, preserve, sentences: training settings other than the defaults.
`ImplantSpec.text` writes the canonical spec (defaults left out, seed always written).

Cache: `<cache>/implants/<base name>/<folder>/` holds `deltas.safetensors` (trained weight minus
original, only the trained tensors, under their Hugging Face names), `implant.json` (every
setting, the training's numbers) and `curve.parquet` (the loss per epoch), vouched for by a
completion marker written last (`idiom_lens.io.write_marker`: the key of every setting and the
sha256 of each file). The key holds the base model's name and a digest of the original values of
the trained layer's MLP weights, the probe set's digest and every training setting, so another
base, set or setting is another implant.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from idiom_lens.errors import InputError
from idiom_lens.io import check_marker, key_digest, write_json, write_marker

if TYPE_CHECKING:
    from idiom_lens.datasets.probes import Probe

Mode = Literal["layer", "neurons"]
Loss = Literal["sequence", "target"]
MODES: tuple[str, ...] = ("layer", "neurons")
LOSSES: tuple[str, ...] = ("sequence", "target")
FORMAT = 1
SPEC_MARK = "+implant"
DEFAULT_DATASET = "implanted"  # the bundled set of new idioms (idiom_lens.datasets.implanted)

# Defaults per mode, tuned on Gemma 3 270M (fp32, CPU) with 100 bundled idioms it does not know
# (benchmarks/implant_bench.py, which reruns the measurement):
# - loss "target" in both modes: the sequence loss (INJ's) changed ordinary text about twice as
#   much for the same implant (layer 8, lr 1e-4: KL 2.3 vs 1.3 nats per token) and costs more per
#   epoch (every position is unembedded, against about 1.3 per probe);
# - layer mode lr 2e-5: side effects shrink with the lr (layer 8: KL 1.3 at 1e-4, 0.77 at 3e-5, 0.63
#   at 1e-5) while the epochs grow (9, 20, 51; layer 2 needs 83 at 1e-5); 80 epochs bound one
#   implant of 100 idioms to about 10 minutes on 2 busy cores;
# - neurons mode: 20 neurons (1% of a Gemma 3 270M layer; INJ trains 0.1% of all the model's
#   neurons, 37 of 36,864, for one sequence) learnt all 100 idioms at lr 1e-2 (layer 8: 31 epochs);
#   a sparse answer keeps the localizers' top-k% scores meaningful.
DEFAULT_N_NEURONS = 20
DEFAULT_LR: dict[str, float] = {"layer": 2e-5, "neurons": 1e-2}
DEFAULT_MAX_EPOCHS: dict[str, int] = {"layer": 80, "neurons": 100}
DEFAULT_LOSS: dict[str, str] = {"layer": "target", "neurons": "target"}
DEFAULT_STOP_LOSS = 0.05
DEFAULT_BATCH_SIZE = 25
# The preservation term (ours; INJ has none: it injects one sequence into 0.1% of the weights, we
# teach 120 idioms to a whole layer): KL(base || implanted) on ordinary text (sentences of the Lee
# news corpus, which the side effects are not measured on), added to the loss with this weight.
# Measured (benchmarks/implant_bench.py, layer 8, the 120 bundled implanted idioms, all learnt in
# 28-30 epochs; held-out KL per token on the text set / its last-token predictions changed /
# memorized idioms among the first 400 bundled ones, base 0.385): weight 0 (100 stand-in idioms, lr
# 1e-5 to 3e-5): 0.6-0.8 / 43-46% / not measured;
# 1: 0.15 / 26% / 0.338; 3: 0.11 / 23% / 0.343; 10: 0.077 / 19% / 0.365 (28 lost, 20 gained).
DEFAULT_PRESERVE = 10.0
DEFAULT_PRESERVE_SENTENCES = 256

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # W_gate, W_in, W_out (Gemma, Llama, Mistral, Qwen)
DELTAS_FILE = "deltas.safetensors"
SETTINGS_FILE = "implant.json"
CURVE_FILE = "curve.parquet"
MARKER_FILE = ".implant_complete.json"


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ImplantOptions:
    """How to implant: which layer, which weights, which loss, how long.

    - `mode` "layer": the layer's whole MLP is trained (gate, up and down projections: W_gate,
      W_in, W_out); "neurons": only `n_neurons` seeded-random neurons of the layer (their output
      vectors, W_out columns, as in Chang et al.'s INJ; their input weights, W_gate and W_in rows,
      too when `train_inputs`).
    - `loss` "sequence": next-token loss on every token of the probe after its first one (INJ's
      language-model loss; the first word, unpredictable from BOS alone, is not trained); "target":
      on the last word's tokens only.
    - `preserve`: the weight of the preservation term, KL(base || implanted) of the next-token
      distributions at every position of `preserve_sentences` ordinary sentences (the Lee news
      corpus's training part, seeded; 0 turns it off: plain fine-tuning as INJ).
    - `lr`, `max_epochs`, `loss` and (neurons mode) `n_neurons` default per mode (None: the
      mode's default, filled in here). Training is Adam on mini-batches of `batch_size` probes, and
      stops when every probe is greedily predicted and the mean loss on the target tokens is below
      `stop_loss`, or after `max_epochs`.
    Raises `InputError` for a bad value.
    """

    layer: int
    seed: int = 0
    mode: Mode = "layer"
    n_neurons: int | None = None
    train_inputs: bool = False
    loss: Loss | None = None
    lr: float | None = None
    max_epochs: int | None = None
    stop_loss: float = DEFAULT_STOP_LOSS
    batch_size: int = DEFAULT_BATCH_SIZE
    preserve: float = DEFAULT_PRESERVE
    preserve_sentences: int = DEFAULT_PRESERVE_SENTENCES

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("layer", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.mode == "layer":
            if self.n_neurons is not None:
                raise InputError(f"n_neurons is for mode 'neurons' (the whole-layer choice trains every neuron), got "
                                 f"{self.n_neurons!r}")
            if self.train_inputs:
                raise InputError("train_inputs is for mode 'neurons' (the whole-layer choice trains the input weights "
                                 "already)")
        else:
            n = DEFAULT_N_NEURONS if self.n_neurons is None else self.n_neurons
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise InputError(f"n_neurons must be a whole number >= 1, got {self.n_neurons!r}")
            object.__setattr__(self, "n_neurons", n)
        loss = DEFAULT_LOSS[self.mode] if self.loss is None else self.loss
        if loss not in LOSSES:
            raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        object.__setattr__(self, "loss", loss)
        lr = DEFAULT_LR[self.mode] if self.lr is None else self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise InputError(f"lr must be a number > 0, got {self.lr!r}")
        object.__setattr__(self, "lr", float(lr))
        epochs = DEFAULT_MAX_EPOCHS[self.mode] if self.max_epochs is None else self.max_epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise InputError(f"max_epochs must be a whole number >= 1, got {self.max_epochs!r}")
        object.__setattr__(self, "max_epochs", epochs)
        if isinstance(self.stop_loss, bool) or not isinstance(self.stop_loss, (int, float)) or not self.stop_loss > 0:
            raise InputError(f"stop_loss must be a number > 0, got {self.stop_loss!r}")
        object.__setattr__(self, "stop_loss", float(self.stop_loss))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}")
        if isinstance(self.preserve, bool) or not isinstance(self.preserve, (int, float)) or not (
                0 <= self.preserve < float("inf")):
            raise InputError(f"preserve must be a number >= 0 (0: no preservation term), got {self.preserve!r}")
        object.__setattr__(self, "preserve", float(self.preserve))
        n = self.preserve_sentences
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"preserve_sentences must be a whole number >= 1, got {n!r}")

    def key(self) -> dict[str, Any]:
        """Every setting that changes the trained weights (n_neurons and train_inputs in neurons mode)."""
        out = asdict(self)
        if self.mode == "layer":
            del out["n_neurons"], out["train_inputs"]
        if self.preserve == 0:
            del out["preserve_sentences"]
        return out


# --------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------

_PARTS_HELP = ("layerL (required), seedS, neurons or neuronsN, inputs, target or sequence, set=NAME, lr=X, "
               "epochs=N, stop=X, batch=N, preserve=X, sentences=N")
_SPEC_EXAMPLE = "gemma-3-270m+implant:layer8:seed0"


@dataclass(frozen=True, kw_only=True)
class ImplantSpec:
    """A parsed implant spec: the base model spec, the implanted probe set and the options."""

    base: str
    dataset: str = DEFAULT_DATASET
    options: ImplantOptions

    def __post_init__(self) -> None:
        if not self.base or not self.base.strip() or SPEC_MARK in self.base:
            raise InputError(f"implant base model {self.base!r}: expected a plain model spec such as 'gemma-3-270m'")
        if not self.dataset or ":" in self.dataset or self.dataset != self.dataset.strip():
            raise InputError(f"implant set {self.dataset!r}: expected a bundled set name or a file path without ':'")

    @property
    def text(self) -> str:
        """The canonical spec: `load_model(spec.text)` loads this implant."""
        o = self.options
        parts = [f"layer{o.layer}", f"seed{o.seed}"]
        if o.mode == "neurons":
            parts.append("neurons" if o.n_neurons == DEFAULT_N_NEURONS else f"neurons{o.n_neurons}")
            if o.train_inputs:
                parts.append("inputs")
        if o.loss != DEFAULT_LOSS[o.mode]:
            parts.append(str(o.loss))
        if self.dataset != DEFAULT_DATASET:
            parts.append(f"set={self.dataset}")
        if o.lr != DEFAULT_LR[o.mode]:
            parts.append(f"lr={o.lr:g}")
        if o.max_epochs != DEFAULT_MAX_EPOCHS[o.mode]:
            parts.append(f"epochs={o.max_epochs}")
        if o.stop_loss != DEFAULT_STOP_LOSS:
            parts.append(f"stop={o.stop_loss:g}")
        if o.batch_size != DEFAULT_BATCH_SIZE:
            parts.append(f"batch={o.batch_size}")
        if o.preserve != DEFAULT_PRESERVE:
            parts.append(f"preserve={o.preserve:g}")
        if o.preserve_sentences != DEFAULT_PRESERVE_SENTENCES:
            parts.append(f"sentences={o.preserve_sentences}")
        return f"{self.base}{SPEC_MARK}:" + ":".join(parts)

    def command(self) -> str:
        """The `idiom-lens implant` command that trains and stores this implant."""
        o = self.options
        words = ["idiom-lens implant", f"--model {self.base}", f"--dataset {self.dataset}", f"--layer {o.layer}",
                 f"--seed {o.seed}", f"--implant-mode {o.mode}"]
        if o.mode == "neurons":
            words.append(f"--n-neurons {o.n_neurons}")
            if o.train_inputs:
                words.append("--train-inputs")
        words += [f"--loss {o.loss}", f"--lr {o.lr:g}", f"--max-epochs {o.max_epochs}", f"--stop-loss {o.stop_loss:g}",
                  f"--train-batch-size {o.batch_size}", f"--preserve {o.preserve:g}",
                  f"--preserve-sentences {o.preserve_sentences}"]
        return " ".join(words)


def is_implant_spec(spec: str) -> bool:
    """True when `spec` asks for an implanted model (`BASE+implant:...`)."""
    return isinstance(spec, str) and SPEC_MARK in spec


def parse_implant_spec(spec: str) -> ImplantSpec:
    """Parse `BASE+implant:PART:PART...` (grammar in the module docstring); `InputError` naming the
    bad part and what was expected."""
    base, mark, rest = spec.strip().partition(SPEC_MARK)
    if not mark:
        raise InputError(f"model spec {spec!r} is not an implant spec: expected e.g. {_SPEC_EXAMPLE}")
    if not base.strip():
        raise InputError(f"implant spec {spec!r} names no base model before '{SPEC_MARK}': expected e.g. "
                         f"{_SPEC_EXAMPLE}")
    if not rest.startswith(":") or not rest[1:]:
        raise InputError(f"implant spec {spec!r} names no layer: expected '{SPEC_MARK}:' and parts ({_PARTS_HELP}), "
                         f"e.g. {_SPEC_EXAMPLE}")
    values: dict[str, Any] = {}
    dataset = DEFAULT_DATASET

    def once(name: str, part: str) -> None:
        if name in values:
            raise InputError(f"implant spec {spec!r}: part {part!r} sets {name} a second time")

    for part in rest[1:].split(":"):
        token = part.strip()
        match = re.fullmatch(r"(layer|seed|neurons)(\d*)", token)
        if match and (match.group(2) or match.group(1) == "neurons"):
            name, number = match.group(1), match.group(2)
            if name == "neurons":
                once("mode", part)
                values["mode"] = "neurons"
                if number:
                    values["n_neurons"] = int(number)
            else:
                once(name, part)
                values[name] = int(number)
        elif token == "inputs":
            once("train_inputs", part)
            values["train_inputs"] = True
        elif token in LOSSES:
            once("loss", part)
            values["loss"] = token
        elif "=" in token:
            key, _, value = token.partition("=")
            if key == "set":
                if "dataset" in values:
                    raise InputError(f"implant spec {spec!r}: part {part!r} sets set a second time")
                values["dataset"] = dataset = value
                continue
            name, convert = {"lr": ("lr", float), "epochs": ("max_epochs", int), "stop": ("stop_loss", float),
                             "batch": ("batch_size", int), "preserve": ("preserve", float),
                             "sentences": ("preserve_sentences", int)}.get(key, (None, None))
            if name is None or convert is None:
                raise InputError(f"implant spec {spec!r}: part {part!r} is not understood; expected {_PARTS_HELP}")
            once(name, part)
            try:
                values[name] = convert(value)
            except ValueError:
                what = "a whole number" if convert is int else "a number"
                raise InputError(f"implant spec {spec!r}: part {part!r}: {key} must be {what}, got {value!r}") from None
        else:
            hint = (" (a layer or seed needs its number, e.g. layer8)" if token in ("layer", "seed") else "")
            raise InputError(f"implant spec {spec!r}: part {part!r} is not understood{hint}; expected {_PARTS_HELP}")
    values.pop("dataset", None)
    if "layer" not in values:
        raise InputError(f"implant spec {spec!r} names no layer: add a part layerL, e.g. {_SPEC_EXAMPLE}")
    try:
        options = ImplantOptions(**values)
    except InputError as err:
        raise InputError(f"implant spec {spec!r}: {err}") from None
    return ImplantSpec(base=base.strip(), dataset=dataset, options=options)


# --------------------------------------------------------------------------------------
# The MLP weights under a bridge
# --------------------------------------------------------------------------------------


def hf_module(bridge: Any) -> nn.Module:
    """The Hugging Face model under a TransformerBridge (its modules wrapped by the bridge)."""
    return bridge.original_model


def hf_name(name: str) -> str:
    """A parameter name as Hugging Face writes it: the bridge wraps each module, adding
    `._original_component` to the names of the module it wraps."""
    return name.replace("._original_component", "")


def hf_parameters(bridge: Any) -> dict[str, nn.Parameter]:
    """Every parameter of the Hugging Face model under `bridge`, by its Hugging Face name."""
    return {hf_name(name): p for name, p in hf_module(bridge).named_parameters()}


def mlp_parameters(bridge: Any, layer: int) -> dict[str, nn.Parameter]:
    """The gate, up and down projection weights of MLP `layer`, by Hugging Face name
    (`model.layers.{layer}.mlp.{gate,up,down}_proj.weight`: Gemma, Llama and kin). Their neuron
    axis: rows of gate and up, columns of down. `InputError` for another MLP layout."""
    params = hf_parameters(bridge)
    found = {}
    for projection in MLP_PROJECTIONS:
        names = [n for n in params if re.fullmatch(rf"(.+\.)?layers\.{layer}\.mlp\.{projection}\.weight", n)]
        if len(names) != 1:
            raise InputError(
                f"cannot find the MLP weights of layer {layer}: implanting needs a gated MLP with "
                f"{', '.join(MLP_PROJECTIONS)} (Gemma, Llama and kin), and this model has "
                f"{len(names)} parameters named like 'layers.{layer}.mlp.{projection}.weight'"
            )
        found[names[0]] = params[names[0]]
    gate, up, down = found.values()
    if gate.shape != up.shape or down.shape != gate.shape[::-1]:
        raise InputError(f"MLP weights of layer {layer} have shapes {[tuple(p.shape) for p in found.values()]}: "
                         "expected gate and up [d_mlp, d_model], down [d_model, d_mlp]")
    return found


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 of named tensors in their order (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, p in tensors.items():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def base_fingerprint(bridge: Any, layer: int) -> str:
    """sha256 of the original MLP weights of `layer` (names, shapes, dtypes and values): deltas are
    only meaningful added to these exact tensors."""
    return tensors_digest(mlp_parameters(bridge, layer))


def add_deltas(bridge: Any, deltas: Mapping[str, Tensor]) -> None:
    """Add each delta to the Hugging Face weight of that name, in place (`InputError` for an unknown
    name or another shape). The implanted weight is `original + delta`, computed the same way at
    training's end and at load, so both give bit-identical weights."""
    params = hf_parameters(bridge)
    with torch.no_grad():
        for name, delta in deltas.items():
            if name not in params:
                raise InputError(f"implant delta {name!r} names no weight of this model")
            p = params[name]
            if tuple(delta.shape) != tuple(p.shape):
                raise InputError(f"implant delta {name!r} has shape {tuple(delta.shape)}, the weight {tuple(p.shape)}")
            p.add_(delta.to(device=p.device, dtype=p.dtype))


@contextmanager
def deltas_added(bridge: Any, deltas: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, `bridge` carries `deltas`; afterwards its weights are bit-identical to before."""
    params = hf_parameters(bridge)
    saved = {name: params[name].detach().clone() for name in deltas if name in params}
    try:
        add_deltas(bridge, deltas)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------


def probes_digest(probes: Sequence[Probe]) -> str:
    """sha256 of the probes' ids, prompts and targets in order (the order sets the mini-batches)."""
    return key_digest([[p.id, p.prompt, p.target] for p in probes])


def implant_key(*, base: str, fingerprint: str, probes: Sequence[Probe], options: ImplantOptions) -> dict[str, Any]:
    """Every setting an implant depends on; its digest names the cache folder."""
    return {"format": FORMAT, "base": base, "base_mlp_sha256": fingerprint, "probes_sha256": probes_digest(probes),
            "n_probes": len(probes), **options.key()}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "model"


def implant_folder(root: Path, key: Mapping[str, Any]) -> Path:
    """`<root>/implants/<base>/layerL-seedS-MODE-<digest>/` (root: the model cache)."""
    digest = key_digest(dict(key))[:16]
    name = f"layer{key['layer']}-seed{key['seed']}-{key['mode']}-{digest}"
    return Path(root) / "implants" / _safe(str(key["base"])) / name


def stored_reason(folder: Path, key: Mapping[str, Any]) -> str | None:
    """None when `folder` holds a finished implant with this key and intact files, else why not."""
    if not folder.is_dir():
        return "not trained yet"
    return check_marker(folder / MARKER_FILE, dict(key))


@dataclass(frozen=True)
class StoredImplant:
    """An implant read from the cache: its deltas, settings (implant.json) and loss curve rows."""

    folder: Path
    deltas: dict[str, Tensor]
    settings: dict[str, Any]
    curve: list[dict[str, Any]] = field(default_factory=list)


def read_implant(folder: Path, key: Mapping[str, Any]) -> StoredImplant:
    """The implant stored in `folder` (`InputError` unless `stored_reason` is None)."""
    import pandas as pd
    from safetensors.torch import load_file

    reason = stored_reason(folder, key)
    if reason is not None:
        raise InputError(f"implant folder {folder}: {reason}")
    deltas = load_file(str(folder / DELTAS_FILE))
    settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
    curve = pd.read_parquet(folder / CURVE_FILE).to_dict("records")
    return StoredImplant(folder=folder, deltas=deltas, settings=settings, curve=curve)


def write_implant(folder: Path, key: Mapping[str, Any], *, deltas: Mapping[str, Tensor], settings: Mapping[str, Any],
                  curve: Any) -> Path:
    """Store an implant in `folder`, atomically: every file goes to a temporary folder beside it,
    the completion marker last, then the folder is renamed into place (a stale or half-written
    one is replaced). `curve`: a pandas DataFrame."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file({name: t.detach().cpu().contiguous() for name, t in deltas.items()}, str(tmp / DELTAS_FILE),
                  metadata={"format": "pt"})
        write_json(tmp / SETTINGS_FILE, dict(settings))
        curve.to_parquet(tmp / CURVE_FILE, index=False)
        write_marker(tmp / MARKER_FILE, dict(key))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def check_layer(bridge: Any, layer: int) -> None:
    """`InputError` unless the model has MLP `layer`."""
    n_layers = int(bridge.cfg.n_layers)
    if not 0 <= layer < n_layers:
        raise InputError(f"layer {layer} is out of range: this model has layers 0 to {n_layers - 1}")


def stored_implant(bridge: Any, base_name: str, spec: ImplantSpec, root: Path) -> StoredImplant:
    """The stored implant that `spec` names on this base model (`bridge` still without deltas),
    or `InputError` naming the `idiom-lens implant` command that creates it: loading never trains."""
    from idiom_lens.datasets.loaders import load_probes

    check_layer(bridge, spec.options.layer)
    probes = list(load_probes(spec.dataset))
    key = implant_key(base=base_name, fingerprint=base_fingerprint(bridge, spec.options.layer), probes=probes,
                      options=spec.options)
    folder = implant_folder(root, key)
    reason = stored_reason(folder, key)
    if reason is not None:
        raise InputError(f"implanted model {spec.text!r} is not in the cache ({reason}): create it with "
                         f"`{spec.command()}`")
    return read_implant(folder, key)
