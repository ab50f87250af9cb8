"""One configuration system: typed, frozen dataclasses; recipes hold only what differs from the
defaults; dotted overrides on the command line (``train.lr=3e-4``); unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tformer.data.sources import DATASETS
from tformer.model import PRESETS, SIZES, TransformerConfig, architecture_fields, config_for
from tformer.tokenization import KINDS

#: The architecture fields a recipe may set: all but those the tokenizer decides.
_ARCHITECTURE = {name: spec for name, spec in architecture_fields().items()
                 if name not in ("vocab_size", "pad_token_id")}


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


#: The range of every numeric setting: (low, low included, high, high included); None = open.
_AT_LEAST_1 = (1, True, None, False)
_AT_LEAST_0 = (0, True, None, False)
_POSITIVE = (0, False, None, False)
_FRACTION = (0, True, 1, False)  # [0, 1)
_RANGES: dict[str, dict[str, tuple]] = {
    "model": {
        # The architecture's own ranges are TransformerConfig's (checked in ModelSection).
        "lora_r": _AT_LEAST_1, "lora_alpha": _POSITIVE, "lora_dropout": _FRACTION,
    },
    "data": {
        "max_source_length": _AT_LEAST_1, "max_target_length": _AT_LEAST_1,
        "max_train_examples": _AT_LEAST_1, "vocab_size": _AT_LEAST_1, "bpe_dropout": _FRACTION,
        "block_size": _AT_LEAST_1,
    },
    "train": {
        "seed": (0, True, 2**32 - 1, True),  # numpy's seeds
        "max_steps": _AT_LEAST_1, "max_minutes": _POSITIVE, "max_tokens": _AT_LEAST_1,
        "grad_accum": _AT_LEAST_1, "lr": _POSITIVE, "weight_decay": _AT_LEAST_0,
        "adam_betas": _FRACTION, "adam_eps": _POSITIVE, "warmup_steps": _AT_LEAST_0,
        "min_lr_ratio": (0, True, 1, True), "label_smoothing": _FRACTION,
        "clip_grad_norm": _POSITIVE, "log_every": _AT_LEAST_1, "eval_every": _AT_LEAST_1,
        "eval_max_examples": _AT_LEAST_1, "early_stopping_patience": _AT_LEAST_1,
        "keep_last": _AT_LEAST_1, "save_every": _AT_LEAST_1, "num_beams": _AT_LEAST_1,
        "max_new_tokens": _AT_LEAST_1, "no_repeat_ngram_size": _AT_LEAST_0,
        "repetition_penalty": _POSITIVE,
    },
}


def _describe(bounds: tuple) -> str:
    low, low_in, high, high_in = bounds
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _check_ranges(section: str, obj) -> None:
    """ConfigError naming the first numeric field of ``obj`` outside its range in `_RANGES`
    (None, where allowed, means "not set"); floats must also be finite."""
    for name, bounds in _RANGES[section].items():
        value = getattr(obj, name)
        low, low_in, high, high_in = bounds
        for v in value if isinstance(value, tuple) else (value,):
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            ok = math.isfinite(v) and (v >= low if low_in else v > low) and (
                high is None or (v <= high if high_in else v < high))
            if not ok:
                raise ConfigError(f"{section}.{name} must be {_describe(bounds)}, got {value!r}")


@dataclass(frozen=True)
class ModelSection:
    """The own Transformer as a named size, an optional preset (``gpt2``, ``llama``: the
    decoder-only family) and any field of :class:`tformer.model.TransformerConfig` (None = the
    size's or preset's value); or a pretrained Hugging Face seq2seq checkpoint, fine-tuned whole
    or through a LoRA adapter."""

    size: str = "small"
    preset: str | None = None  # a name of tformer.model.PRESETS; None = the paper's model
    pretrained: str | None = None  # Hub name or local directory of an AutoModelForSeq2SeqLM
    # LoRA (pretrained models only): rank of the adapter; None = fine-tune every weight.
    lora_r: int | None = None
    lora_alpha: float = 16.0  # the adapter's output is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05
    # Linear modules to adapt; None = the attention query and value projections of the
    # architecture (T5: [q, v]; BART, Marian, mBART, Pegasus: [q_proj, v_proj]).
    lora_target_modules: tuple[str, ...] | None = None
    # The own Transformer's architecture: every field of TransformerConfig but those the
    # tokenizer decides, as an optional override of the size's value (None = the size's).
    # Declared once, in tformer.model.config; taken from there (`architecture_fields`).
    __annotations__.update({name: hint | None for name, (hint, _) in _ARCHITECTURE.items()})
    locals().update(dict.fromkeys(_ARCHITECTURE))

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ConfigError(f"model.size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(PRESETS)} or null, "
                              f"got {self.preset!r}")
        _check_ranges("model", self)
        if self.pretrained is None:
            self.transformer_config(vocab_size=1, pad_token_id=0)  # architecture errors now
        else:
            own = [f"model.{name}" for name in ("preset", *self._own_fields())
                   if getattr(self, name) is not None]
            if own:
                raise ConfigError(
                    f"{', '.join(own)} describe(s) the own Transformer; with model.pretrained "
                    "the checkpoint's config.json decides the architecture"
                )
        if self.lora_r is not None and self.pretrained is None:
            raise ConfigError("model.lora_r needs model.pretrained: LoRA adapts a pretrained "
                              "model (the own model is trained whole)")
        if self.lora_target_modules is not None and not all(self.lora_target_modules):
            raise ConfigError("model.lora_target_modules must be non-empty module names, got "
                              f"{list(self.lora_target_modules)!r}")

    @classmethod
    def _own_fields(cls) -> list[str]:
        """The fields that size the own Transformer (None = the size's value)."""
        return list(_ARCHITECTURE)

    def transformer_config(self, vocab_size: int, pad_token_id: int) -> TransformerConfig:
        chosen = {
            name: getattr(self, name) for name in self._own_fields()
            if getattr(self, name) is not None
        }
        try:
            return config_for(self.size, vocab_size, self.preset, pad_token_id=pad_token_id,
                              **chosen)
        except ValueError as e:  # TransformerConfig names the field: say it as a recipe key
            raise ConfigError(str(e).replace("TransformerConfig.", "model.")) from e


#: What a run trains (``data.task``): a text-to-text model on {source, target} pairs, a
#: language model on raw text (next-token prediction over packed blocks), or a decoder-only
#: model instruction-tuned on {source, target} pairs as prompts and responses.
TASKS = ("seq2seq", "lm", "sft")
#: The tasks of a decoder-only model.
DECODER_ONLY_TASKS = ("lm", "sft")


@dataclass(frozen=True)
class DataSection:
    """Where the examples come from and how they are cut: a named public dataset (``dataset``,
    read from the local mirror ``$TFORMER_DATA_DIR`` or the Hub, see `tformer.data.sources`),
    files or a Hub name per split (``train``, ``validation``, ``test``), or neither: the embedded
    corpus of the installed packages' docstrings (no download).

    ``task: lm`` reads raw text instead of pairs: ``.txt`` files, folders of them, or the
    ``text_column`` of JSONL/CSV/Parquet files and Hub datasets, one document per file or row
    (see `tformer.data.packing`).

    ``task: sft`` reads the pairs of ``seq2seq`` as prompts (``prefix`` + source) and responses
    (target), rendered with the tokenizer's chat template, several packed to a block of
    ``block_size`` tokens (see `tformer.data.sft`)."""

    task: Literal["seq2seq", "lm", "sft"] = "seq2seq"
    dataset: str | None = None  # a name of `tformer data list`, e.g. "multi30k"
    train: str | None = None  # file (jsonl/csv/tsv/parquet; lm: also txt, a folder) or Hub name
    hub_config: str | None = None  # configuration of a Hub dataset, e.g. "3.0.0"
    validation: str | None = None
    test: str | None = None
    source_column: str = "source"
    target_column: str = "target"
    text_column: str = "text"  # lm: the column holding a document's text
    prefix: str = ""  # prepended to every source, e.g. "summarize: "
    max_source_length: int = 256
    max_target_length: int = 128
    # lm: tokens per training block (the context the model learns on); a block is read with
    # the token after it, its last target
    block_size: int = 256
    max_train_examples: int | None = None  # lm: documents
    tokenizer: str | None = None  # existing tokenizer; None = train one on the training split
    # BPE by default: `tokenizers`' Unigram trainer is not reproducible (two trainings on the
    # same text give different vocabularies), so a run could not be repeated exactly. char and
    # bytelevel (GPT-2's byte-level BPE) are the usual choices of a language model.
    tokenizer_kind: Literal["unigram", "bpe", "char", "bytelevel"] = "bpe"
    vocab_size: int = 8000
    # BPE-dropout (Provilkov et al. 2020): each epoch the training split is encoded afresh with
    # every BPE merge skipped with this probability; validation, test and inference are not.
    bpe_dropout: float = 0.0
    # sft: the Jinja chat template saved with the tokenizer (Hugging Face's chat_template);
    # None = the tokenizer's own, else tformer's (tformer.data.sft.DEFAULT_CHAT_TEMPLATE)
    chat_template: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("task", TASKS), ("tokenizer_kind", KINDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"data.{name} must be one of {list(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if self.dataset is not None:
            if self.dataset not in DATASETS:
                raise ConfigError(f"data.dataset must be one of {', '.join(DATASETS)} "
                                  f"(tformer data list), got {self.dataset!r}")
            given = [f"data.{k}" for k in ("train", "validation", "test", "hub_config")
                     if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"data.dataset={self.dataset} names every split; drop "
                                  f"{', '.join(given)} (or drop data.dataset to give files)")
            kind = "lm" if DATASETS[self.dataset].is_text else "seq2seq"
            if kind != self.task and not (kind, self.task) == ("seq2seq", "sft"):
                raise ConfigError(f"data.dataset={self.dataset} is a {kind} dataset; set "
                                  f"data.task: {kind} (data.task is {self.task})")
        _check_ranges("data", self)
        if self.task == "lm":
            if self.train is None and self.dataset is None:
                raise ConfigError("data.task: lm needs text: data.train (a .txt file, a folder "
                                  "of them, a JSONL file or a Hub name) or data.dataset")
            if self.bpe_dropout:
                raise ConfigError("data.bpe_dropout applies to data.task: seq2seq (a language "
                                  "model's windows are encoded once)")
            if self.prefix:
                raise ConfigError("data.prefix applies to data.task: seq2seq (its sources)")
        if self.task == "sft" and self.bpe_dropout:
            raise ConfigError("data.bpe_dropout applies to data.task: seq2seq (sft examples "
                              "are encoded once)")
        if self.chat_template is not None and self.task != "sft":
            raise ConfigError("data.chat_template applies to data.task: sft")


@dataclass(frozen=True)
class TrainSection:
    output_dir: str = "runs/run"
    seed: int = 0
    max_steps: int = 1000  # optimizer steps
    max_minutes: float | None = None  # wall-clock budget: stop, evaluate and save when spent
    max_tokens: int = 4096  # token budget of one micro-batch (see data.TokenBudgetBatchSampler)
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.98)  # the paper's β2 = 0.98 (section 5.3)
    adam_eps: float = 1e-9
    schedule: Literal["inverse_sqrt", "cosine", "linear", "constant"] = "inverse_sqrt"
    # horizon of the cosine/linear decay: max_steps, or the max_minutes wall-clock budget
    decay_over: Literal["steps", "time"] = "steps"
    warmup_steps: int = 400
    min_lr_ratio: float = 0.0  # cosine/linear floor as a fraction of lr
    label_smoothing: float = 0.1
    clip_grad_norm: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile the training forward and loss (not validation or generation): fused
    # kernels for a minute or two of compiling at the start (docs/usage.md, "Compiling").
    compile: bool = False
    log_every: int = 20
    eval_every: int = 200
    eval_max_examples: int = 200  # generation-metric sample size at each evaluation
    metric: Literal["rougeL", "rouge1", "bleu", "chrf"] = "rougeL"
    early_stopping_patience: int | None = None  # evaluations without improvement
    keep_last: int = 2
    save_every: int | None = None  # None = at every evaluation
    # Generation for validation's metric and the test score (Hugging Face generate()'s
    # options of the same names; `tformer generate` and `evaluate` take them as flags).
    num_beams: int = 1
    max_new_tokens: int = 64
    no_repeat_ngram_size: int = 0  # no n-gram of this size twice in an output; 0 = off
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the output less likely
    # LoRA runs: at the end, write the adapter merged into the weights as a plain model
    # directory in the best and last checkpoints (the adapter stays in CKPT/adapter/).
    merge_lora: bool = True

    def generation_options(self) -> dict[str, Any]:
        """Options of `tformer.generation.generate_texts` for validation and the test score."""
        return dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                    no_repeat_ngram_size=self.no_repeat_ngram_size,
                    repetition_penalty=self.repetition_penalty)

    def __post_init__(self) -> None:
        _check_ranges("train", self)
        choices = {
            "schedule": ("inverse_sqrt", "cosine", "linear", "constant"),
            "decay_over": ("steps", "time"),
            "precision": ("auto", "fp32", "bf16", "fp16"),
            "metric": ("rougeL", "rouge1", "bleu", "chrf"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"train.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if self.decay_over == "time":
            if self.max_minutes is None:
                raise ConfigError("train.decay_over: time needs train.max_minutes (the horizon)")
            if self.schedule not in ("cosine", "linear"):
                raise ConfigError(
                    "train.decay_over: time applies to train.schedule cosine or linear, "
                    f"got {self.schedule!r}"
                )


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        """The settings of two sections that must agree."""
        d, t = self.data, self.train
        if self.model.pretrained is None:
            core = self.model.transformer_config(vocab_size=1, pad_token_id=0)
            decoder_only = core.n_encoder_layers == 0
            if d.task in DECODER_ONLY_TASKS and not decoder_only:
                raise ConfigError(f"data.task: {d.task} trains a decoder-only model: set "
                                  "model.preset: gpt2 (or llama), or model.n_encoder_layers: 0")
            if d.task == "seq2seq" and decoder_only:
                raise ConfigError("model.n_encoder_layers: 0 is a decoder-only model, trained "
                                  "with data.task: lm or sft")
            if d.task in DECODER_ONLY_TASKS and d.block_size > core.max_positions:
                raise ConfigError(f"data.block_size ({d.block_size}) exceeds the positions the "
                                  f"model has, model.max_positions ({core.max_positions})")
        if d.task in DECODER_ONLY_TASKS and t.max_tokens % d.block_size:
            raise ConfigError(
                f"train.max_tokens ({t.max_tokens}) must be a multiple of data.block_size "
                f"({d.block_size}) for data.task: {d.task}: a micro-batch is max_tokens / "
                "block_size blocks")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(_plain(self.to_dict()), sort_keys=False))


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """Check a recipe value against the field's type; ints are accepted where floats are."""
    name = f"{section}.{f.name}"
    hint = typing.get_type_hints(_SECTIONS[section])[f.name]
    union = typing.get_origin(hint) in (types.UnionType, typing.Union)
    options = typing.get_args(hint) if union else (hint,)
    if isinstance(value, Raw):
        for option in sorted(options, key=lambda o: o is str):  # str last: it takes anything
            try:
                value = _read_raw(value, option)
                break
            except (ValueError, yaml.YAMLError):
                continue
        else:
            raise ConfigError(f"{name} expects {hint}, got {str(value)!r}")
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{name} may not be null")
    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option)
        if origin is Literal:
            if value in typing.get_args(option):
                return value
        elif origin is tuple:
            args = typing.get_args(option)
            if not isinstance(value, (list, tuple)):
                continue
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: any length
                if all(isinstance(v, args[0]) for v in value):
                    return tuple(value)
            elif len(value) == len(args) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                return tuple(float(v) for v in value)
        elif option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{name} is too large: {value!r}") from None
        elif option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif option in (str, bool) and isinstance(value, option):
            return value
    raise ConfigError(f"{name} expects {hint}, got {value!r} ({type(value).__name__})")


def build_config(values: dict[str, Any], source: str = "config") -> Config:
    """Nested mapping -> Config. Unknown sections or keys are errors that list the valid ones."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; valid: {sorted(_SECTIONS)}")
    sections = {}
    for section, cls in _SECTIONS.items():
        given = values.get(section)
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys, found "
                              f"a {type(given).__name__}: {str(given)[:80]!r}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        bad = sorted(set(given) - set(known), key=str)
        if bad:
            raise ConfigError(
                f"{source}: unknown key(s) {[f'{section}.{k}' for k in bad]}; "
                f"valid keys of {section!r}: {sorted(known)}"
            )
        sections[section] = cls(**{k: _coerce(section, known[k], v) for k, v in given.items()})
    return Config(**sections)


class Raw(str):
    """An override's value as typed on the command line; read by the field's type, so that
    ``data.prefix=summarize: `` stays a string and ``train.lr=3e-4`` becomes a number."""


def parse_override(text: str) -> tuple[str, str, Raw]:
    """``section.key=value`` -> (section, key, raw value)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=3e-4")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    return section, key, Raw(raw)


def _read_raw(raw: Raw, option: Any) -> Any:
    """Read a command-line string as ``option``; ValueError if it is not one."""
    if option is type(None):
        if raw.strip().lower() in ("null", "none", "~"):
            return None
        raise ValueError
    if option is bool:
        value = yaml.safe_load(raw)
        if isinstance(value, bool):
            return value
        raise ValueError
    if option is int:
        return int(raw)
    if option is float:
        return float(raw)
    if typing.get_origin(option) is tuple:
        value = yaml.safe_load(raw)
        if isinstance(value, list):
            return value
        raise ValueError
    return str(raw)  # str and Literal: the text itself


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- recipe YAML <- ``section.key=value`` overrides."""
    values: dict[str, Any] = {}
    source = "command line"
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"recipe {str(path)!r} must be a mapping of sections (model:, data:, train:), "
                f"found a {type(loaded).__name__}: {str(loaded)[:80]!r}"
            )
        values = loaded or {}
        source = str(path)
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        values[section][key] = value
    return build_config(values, source)
