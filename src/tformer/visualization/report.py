"""The report of a training run: one self-contained HTML file, ``RUN_DIR/report.html``.

It holds, from the files a run writes (see ``tformer.training.loop``):

- the run's outcome (``summary.json``) and test scores (``test_metrics.json``);
- the resolved configuration (``config.yaml``);
- data statistics (``data_stats.json``): examples per split, truncations, the padding fraction
  of training batches, histograms of training source and target lengths in tokens (a
  decoder-only run: documents and tokens, or examples and prompts cut, and its batches);
- curves (``metrics.jsonl``): training and validation loss, learning rate, tokens/s, and the
  validation metric;
- sample predictions beside their references (``test_predictions.jsonl``, else the samples of
  the last validation);
- attention maps of a few validation sources under the best checkpoint (else the last one),
  each target generated greedily by that checkpoint, in the interactive viewer. A decoder-only
  model's causal self-attention: for an instruction-tuned one (``data.task: sft``) over the
  rendered chat prompt of a few validation examples followed by its greedy answer, for a
  language model (``lm``) over the start of the validation text, read in the model's own
  context (capped at `ATTENTION_MAX_TOKENS`, the end kept).

Charts are inline SVG, the viewer inline JavaScript: the file needs no network and no other
file. A missing or damaged input (an interrupted run) gives its section a "not available"
note; the rest of the report is still written.
"""

from __future__ import annotations

import html
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import yaml

from tformer.data.sft import chat_prompts
from tformer.engines import load
from tformer.generation import Seq2Seq, encode_prompts, max_source_length_of
from tformer.training.checkpoint import latest_checkpoint
from tformer.training.config import DECODER_ONLY_TASKS
from tformer.visualization.attention import (
    AttentionMaps,
    attention_maps_batch,
    causal_attention_maps,
)
from tformer.visualization.run import RunFileError, read_metrics
from tformer.visualization.svg import Series, histogram, line_chart
from tformer.visualization.viewer import VIEWER_CSS, VIEWER_JS, viewer_fragment

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
METRICS = ("rougeL", "rouge1", "rouge2", "bleu", "chrf")  # validation/test scores, if present
ATTENTION_EXAMPLES = 3
# Attention examples are kept short: the viewer embeds every layer and head as JSON.
ATTENTION_MAX_SOURCE_TOKENS = 48
ATTENTION_MAX_NEW_TOKENS = 32
# A decoder-only example's one sequence (prompt and answer, or a window of text), at most: the
# maps of T tokens hold T² weights per head, the seq2seq ones 48² + 33² + 33 · 48.
ATTENTION_MAX_TOKENS = 128
_CAUSAL_AXES = ("Rows and columns: the token read at that position (a row predicts the next "
                "token); the upper triangle is 0, no position sees a later one.")
SAMPLE_ROWS = 10

CSS = """
body { font-family: "DejaVu Sans", "WenQuanYi Zen Hei", "Noto Sans CJK SC", sans-serif;
  margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 13px; }
table { border-collapse: collapse; font-size: 14px; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.missing { color: #a33; font-style: italic; }
nav a { margin-right: 1em; }
"""


def write_report(run_dir: Path | str, *, attention_examples: int = ATTENTION_EXAMPLES,
                 device: str | None = None) -> Path:
    """Write ``run_dir/report.html`` from what the run left there; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    summary = _read_json(run_dir / "summary.json")
    try:
        metrics = read_metrics(run_dir / "metrics.jsonl")
    except RunFileError as error:
        log.warning("%s; the sections drawn from metrics.jsonl are left out", error)
        metrics = []
    task = _task(run_dir)
    sections = [
        ("summary", "Run", _summary_section(run_dir, summary)),
        ("config", "Configuration", _config_section(run_dir)),
        ("data", "Data", _data_section(run_dir, task)),
        ("curves", "Training curves", _curves_section(metrics)),
        ("predictions", "Sample predictions", _predictions_section(run_dir, metrics)),
        ("attention", "Attention", _attention_section(run_dir, summary, metrics, task,
                                                      attention_examples, device)),
    ]
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{content}</section>'
                   for key, title, content in sections)
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>tformer report: {_e(run_dir.name)}</title><style>{CSS}{VIEWER_CSS}</style>"
        f"</head><body><h1>tformer run report</h1><p>{_e(run_dir.resolve())} · written {written}"
        f"</p><nav>{nav}</nav>{body}<script>{VIEWER_JS}</script></body></html>\n"
    )
    path = run_dir / REPORT_NAME
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a report
    log.info("report: %s", path)
    return path


# --- sections ----------------------------------------------------------------------------


def _summary_section(run_dir: Path, summary: dict | None) -> str:
    if summary is None:
        return _missing("summary.json", "the run did not finish (or is still running)")
    state = summary.get("state", {})
    rows = [
        ("stopped by", summary.get("stopped_by")),
        ("steps", state.get("step")),
        ("tokens seen", state.get("tokens_seen")),
        ("training time (s)", _fmt(state.get("elapsed_seconds"))),
        ("best validation metric",
         f"{_fmt(state.get('best_metric'))} at step {state.get('best_step')}"
         if state.get("best_step") is not None else "none (no validation yet)"),
        ("best checkpoint", summary.get("best_checkpoint")),
        ("last checkpoint", summary.get("last_checkpoint")),
    ]
    out = _table(["", ""], rows, show_header=False)
    test = _read_json(run_dir / "test_metrics.json")
    if test:
        shown = [(k, _fmt(v)) for k, v in test.items() if not isinstance(v, (dict, list))]
        out += "<h3>Test</h3>" + _table(["", ""], shown, show_header=False)
    return out


def _config_section(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return _missing("config.yaml")
    text = path.read_text(encoding="utf-8")
    return (f"<details><summary>config.yaml, every setting as resolved "
            f"({len(text.splitlines())} lines)</summary><pre>{_e(text)}</pre></details>")


def _data_section(run_dir: Path, task: str | None) -> str:
    """Examples and truncations per split, the training batches, the source and target length
    histograms; a decoder-only run (``data.task`` lm or sft) has one sequence per example, and
    its own counts instead of those of sources and targets."""
    stats = _read_json(run_dir / "data_stats.json")
    if stats is None:
        return _missing("data_stats.json")
    parts = []
    sizes = stats.get("sizes") or {}
    splits = list(dict.fromkeys([*sizes, *(k[: -len("_truncation")] for k in stats
                                            if k.endswith("_truncation"))]))
    truncation = {split: stats.get(f"{split}_truncation") or {} for split in splits}
    if task == "lm":  # documents joined into one token stream per split
        tokens = stats.get("tokens") or {}
        table = (["split", "documents", "tokens"],
                 [(split, sizes.get(split), tokens.get(split)) for split in splits])
    elif task == "sft":
        table = (["split", "examples", "prompts cut to the block"],
                 [(split, truncation[split].get("examples", sizes.get(split)),
                   truncation[split].get("truncated")) for split in splits])
    else:
        table = (["split", "examples", "truncated sources", "truncated targets"],
                 [(split, sizes.get(split, truncation[split].get("examples")),
                   truncation[split].get("truncated_sources"),
                   truncation[split].get("truncated_targets")) for split in splits])
    if splits:
        parts.append(_table(*table))
    if "blocks_per_batch" in stats:
        parts.append(f"<p>Training batches: {stats['blocks_per_batch']} windows of the block, "
                     f"{stats.get('batches_per_epoch')} batches an epoch</p>")
    if "rows_per_batch" in stats:
        parts.append(f"<p>Training batches: {stats['rows_per_batch']} rows of the block, "
                     f"{_fmt(stats.get('examples_per_row'))} examples a row, "
                     f"{100 * float(stats.get('packing_fill', 0)):.1f}% of each row filled</p>")
    if "padding_fraction" in stats:
        parts.append(f"<p>Padding fraction of training batches: "
                     f"{100 * float(stats['padding_fraction']):.1f}%</p>")
    notes = [str(v) for k, v in stats.items() if k.endswith("_load") or k == "corpus"]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    charts = [histogram(stats[key], f"training {side} lengths", "tokens")
              for key, side in (("train_source_lengths", "source"),
                                ("train_target_lengths", "target")) if stats.get(key)]
    if charts:
        parts.append('<div class="charts">' + "".join(charts) + "</div>")
    elif task not in DECODER_ONLY_TASKS:
        parts.append(_missing("length histograms", "no lengths in data_stats.json"))
    return "".join(parts)


def _curves_section(metrics: list[dict]) -> str:
    if not metrics:
        return _missing("metrics.jsonl", "nothing was logged")
    train = [r for r in metrics if r.get("split") == "train"]
    valid = [r for r in metrics if r.get("split") == "validation"]

    def series(records, key, label, markers=False) -> Series:
        pts = [(r["step"], r[key]) for r in records if key in r and "step" in r]
        return Series(label, [p[0] for p in pts], [p[1] for p in pts], markers)

    charts = [
        line_chart([series(train, "loss", "training"), series(valid, "loss", "validation", True)],
                   "loss", "optimizer step", "cross-entropy (nats/token)"),
        line_chart([series(train, "lr", "learning rate")], "learning rate", "optimizer step", "lr"),
        line_chart([series(train, "tokens_per_s", "tokens/s")], "throughput", "optimizer step",
                   "tokens/s (source + target)"),
    ]
    names = [m for m in METRICS if any(m in r for r in valid)]
    charts += [line_chart([series(valid, m, m, True)], f"validation {m}", "optimizer step", m)
               for m in names]
    return '<div class="charts">' + "".join(charts) + "</div>"


def _predictions_section(run_dir: Path, metrics: list[dict]) -> str:
    path = run_dir / "test_predictions.jsonl"
    if path.is_file():
        try:
            records = read_metrics(path)[:SAMPLE_ROWS]
        except RunFileError as error:
            return _missing("predictions", str(error))
        where = f"test set (first {len(records)} of test_predictions.jsonl)"
    else:
        valid = [r for r in metrics if r.get("split") == "validation" and r.get("samples")]
        if not valid:
            return _missing("predictions", "no test_predictions.jsonl and no validation samples")
        records = valid[-1]["samples"][:SAMPLE_ROWS]
        where = f"validation at step {valid[-1].get('step')} (sources cut at 300 characters)"
    rows = [(r.get("source", ""), r.get("reference") or " | ".join(r.get("references", [])),
             r.get("prediction", "")) for r in records]
    return f"<p>From the {_e(where)}.</p>" + _table(["source", "reference", "prediction"], rows)


def _attention_section(run_dir: Path, summary: dict | None, metrics: list[dict],
                       task: str | None, examples: int, device: str | None) -> str:
    checkpoint = _checkpoint(run_dir, summary)
    if checkpoint is None:
        return _missing("attention maps", "no checkpoint in this run")
    samples = [s for r in metrics if r.get("split") == "validation"
               for s in r.get("samples", []) if isinstance(s.get("source"), str)]
    if not samples:
        return _missing("attention maps", "no validation samples in metrics.jsonl")
    try:
        seq2seq = load(checkpoint, device=device, engine="torch")
        if seq2seq.family != "causal":
            intro, shown = _seq2seq_examples(seq2seq, samples, examples)
        elif task == "sft":
            intro, shown = _chat_examples(seq2seq, samples, examples)
        else:
            intro, shown = _text_window(seq2seq, samples)
    except Exception as error:  # noqa: BLE001 (a report with a note beats no report)
        log.warning("report: attention maps of %s failed: %s", checkpoint, error)
        return _missing("attention maps", f"{checkpoint}: {type(error).__name__}: {error}")
    viewers = [f"<h3>Example {i + 1}</h3>" + viewer_fragment(maps, caption)
               for i, (maps, caption) in enumerate(shown)]
    return f"<p>Checkpoint {_e(checkpoint)}. {_e(intro)} Hover a cell for its weight.</p>" + \
        "".join(viewers)


def _seq2seq_examples(seq2seq: Seq2Seq, samples: list[dict],
                      examples: int) -> tuple[str, list[tuple[AttentionMaps, str]]]:
    """The first validation sources, each with the checkpoint's greedy output."""
    sources = list(dict.fromkeys(s["source"] for s in samples))[:examples]
    maps = attention_maps_batch(seq2seq, sources, max_new_tokens=ATTENTION_MAX_NEW_TOKENS,
                                max_source_length=ATTENTION_MAX_SOURCE_TOKENS)
    intro = (f"Each target is the checkpoint's own greedy output (at most "
             f"{ATTENTION_MAX_NEW_TOKENS} tokens; sources cut at {ATTENTION_MAX_SOURCE_TOKENS} "
             "tokens), read back in one teacher-forced pass. Rows of cross and decoder maps: the "
             "token predicted at that position; columns of decoder maps: the token read there.")
    return intro, [(m, "source: " + " ".join(m.source_tokens) + " | prediction: "
                    + " ".join(m.target_tokens)) for m in maps]


def _chat_examples(seq2seq: Seq2Seq, samples: list[dict],
                   examples: int) -> tuple[str, list[tuple[AttentionMaps, str]]]:
    """An instruction-tuned model: the chat prompts of the first validation examples, each
    followed by the checkpoint's greedy answer, generated in the model's own context."""
    messages = list(dict.fromkeys(s["source"] for s in samples))[:examples]
    prompts = chat_prompts(seq2seq.tokenizer, messages)
    answers = seq2seq.generate(prompts, max_new_tokens=ATTENTION_MAX_NEW_TOKENS)
    shown = _shown_tokens(seq2seq)
    maps = attention_maps_batch(seq2seq, prompts, answers, max_source_length=shown)
    intro = (f"Each example is a validation prompt (cut at 300 characters) rendered with the "
             f"checkpoint's chat template, then the checkpoint's own greedy answer (at most "
             f"{ATTENTION_MAX_NEW_TOKENS} tokens), read in one pass; the maps hold the last "
             f"{shown} tokens at most. {_CAUSAL_AXES}")
    return intro, [(m, f"prompt: {message} | answer: {answer}")
                   for m, message, answer in zip(maps, messages, answers)]


def _text_window(seq2seq: Seq2Seq, samples: list[dict]
                 ) -> tuple[str, list[tuple[AttentionMaps, str]]]:
    """A language model: the first tokens of the validation text (a sample's prompt and the
    text that followed it), as many as the model reads at once."""
    text = max((s["source"] + (s.get("reference") or "") for s in samples), key=len)
    if not text:
        raise ValueError("the validation samples hold no text")
    window = encode_prompts(seq2seq.tokenizer, [text])[0][:_shown_tokens(seq2seq)]
    maps = causal_attention_maps(seq2seq.model, seq2seq.tokenizer, [window], [len(window)])
    intro = (f"The first {len(window)} tokens of the validation text, read in one pass. "
             f"{_CAUSAL_AXES}")
    return intro, [(maps[0], "validation text: " + seq2seq.tokenizer.decode(window))]


def _shown_tokens(seq2seq: Seq2Seq) -> int:
    """The most tokens of a decoder-only example: the model's own context (its position table,
    its tokenizer's limit: the block it was trained on), up to `ATTENTION_MAX_TOKENS`."""
    return min(max_source_length_of(seq2seq.model, seq2seq.tokenizer), ATTENTION_MAX_TOKENS)


def _task(run_dir: Path) -> str | None:
    """``data.task`` of the run's ``config.yaml`` (None without a readable one)."""
    config = _read_mapping(run_dir / "config.yaml", yaml.safe_load, yaml.YAMLError, "YAML")
    data = (config or {}).get("data")
    return data.get("task") if isinstance(data, dict) else None


# --- helpers -----------------------------------------------------------------------------


def _checkpoint(run_dir: Path, summary: dict | None) -> Path | None:
    """The best checkpoint, else the last, else the newest complete one on disk. Paths in
    summary.json are tried as written, then inside this run directory (it may have moved)."""
    for key in ("best_checkpoint", "last_checkpoint"):
        name = (summary or {}).get(key)
        if not name:
            continue
        for path in (Path(name), run_dir / "checkpoints" / Path(name).name):
            if (path / "config.json").is_file():
                return path
    return latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() \
        else None


def _read_json(path: Path) -> dict | None:
    return _read_mapping(path, json.loads, json.JSONDecodeError, "JSON")


def _read_mapping(path: Path, loads, error: type[Exception], language: str) -> dict | None:
    """The mapping ``path`` holds, read by ``loads``; None when there is no file, when it is
    not ``language`` (``loads`` raised ``error``: a warning) or holds no mapping."""
    if not path.is_file():
        return None
    try:
        value = loads(path.read_text(encoding="utf-8"))
    except error as problem:
        log.warning("%s: not %s (%s); what the report reads from it is left out", path,
                    language, problem)
        return None
    return value if isinstance(value, dict) else None


def _table(columns: list[str], rows, show_header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>" if show_header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e('' if v is None else v)}</td>" for v in row)
                   + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _missing(what: str, why: str = "") -> str:
    return f'<p class="missing">{_e(what)}: not available{(" (" + _e(why) + ")") if why else ""}</p>'


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _e(value) -> str:
    return html.escape(str(value))
