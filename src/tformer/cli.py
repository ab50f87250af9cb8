"""``tformer <verb>``: parses arguments, then calls one library function per verb.

Each verb imports the library it calls inside its function, for import time: ``tformer --help``
and a verb that needs no model do not load torch, transformers and the server (measured on
the loaded 2-core host: 27 s to import the package against 31.5 s with every verb's modules;
more when the server's dependencies are cold)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from tformer.recipe import run_recipe  # import time (module docstring)
    from tformer.training import load_config

    config = load_config(args.recipe, args.overrides)
    result = run_recipe(config, resume=args.resume, overwrite=args.overwrite)
    print(f"run directory: {result.run_dir}")
    print(f"best checkpoint: {result.best_checkpoint}")
    print(f"stopped by: {result.stopped_by} at step {result.state.step}")
    return 130 if result.stopped_by == "interrupted" else 0


def _demo(args: argparse.Namespace) -> int:
    from tformer.demo import run_demo  # import time (module docstring)

    run_demo(args.recipe, args.overrides)
    return 0


def _data(args: argparse.Namespace) -> int:
    from tformer.data import sources  # import time (module docstring)

    if args.action == "list":
        root = sources.data_dir()
        for source in sources.DATASETS.values():
            config = f", config {source.hub_config}" if source.hub_config else ""
            print(f"{source.name}: {source.task}; {source.license}")
            columns = (f"columns {' + '.join(source.text_columns)} -> one document (data.task: "
                       "lm)" if source.is_text else f"columns {source.source_column} -> source, "
                       f"{source.target_column} -> target")
            print(f"  Hub: {source.hub_id}{config}, {columns}")
            for role, split in source.splits.items():
                rows = "lines" if split.file.endswith(".txt") else "rows"
                print(f"  {role:<10} Hub split {split.hub_split:<15} mirror {source.name}/"
                      f"{split.file} ({split.rows:,} {rows} in the reference mirror)")
            print(f"  note: {source.note}")
        where = root if root is not None else f"unset: set {sources.DATA_DIR_ENV} to use one"
        print(f"\nmirror ({sources.DATA_DIR_ENV}): {where}")
        return 0
    root = args.to or args.dir or sources.data_dir()
    if root is None:
        raise ValueError(f"no mirror directory: pass --to DIR or set {sources.DATA_DIR_ENV}")
    root = Path(root).expanduser()
    names = args.names or list(sources.DATASETS)
    for name in names:
        sources.get_source(name)  # an unknown name fails before any download
    if args.action == "write":
        for name in names:
            for path, rows in sources.write_mirror(name, root).items():
                print(f"wrote {path} ({rows:,} rows)")
        return 0
    checks = list(sources.verify_mirror(root, names))
    for check in checks:
        print(check)
    bad = [c for c in checks if not c.ok]
    if bad:
        print(f"{len(bad)} of {len(checks)} files differ from the reference mirror: figures "
              "measured on this mirror are not comparable with docs/results.md")
        return 1
    print(f"all {len(checks)} files match the reference mirror")
    return 0


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="longest output, in tokens (always passed to generate(); default 128)")
    g.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--early-stopping", action="store_true", default=None, help="end a beam "
                   "search once num_beams hypotheses are finished (what CTranslate2 always does)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 makes tokens "
                   "already in the output less likely (1 = off)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="seed for sampling")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--max-source-length", type=int, default=None, help="truncate sources to "
                   "this many tokens (default: the checkpoint's limit, the smaller of its "
                   "tokenizer's model_max_length and its position table; 1024 for tformer's)")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")


def _generation_options(args: argparse.Namespace) -> dict:
    import torch  # import time (module docstring)

    torch.manual_seed(args.seed)
    return dict(
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
        length_penalty=args.length_penalty, early_stopping=args.early_stopping,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        repetition_penalty=args.repetition_penalty, do_sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        batch_size=args.batch_size, max_source_length=args.max_source_length,
    )


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default="auto", choices=["auto", "torch", "ctranslate2"],
                   help="auto (default): CTranslate2 for a `tformer export` directory, else "
                   "PyTorch; ctranslate2 converts any other checkpoint in memory")
    g.add_argument("--compute-type", default=None, help="CTranslate2 only: int8, int8_float32, "
                   "float16, float32, ... (default: the exported weights' type)")
    g.add_argument("--ct2-threads", type=int, default=None, help="CTranslate2 only: threads per "
                   "batch (intra_threads; default: CTranslate2's choice). See docs/inference.md "
                   "for int8 on small CPUs")


def _engine_options(args: argparse.Namespace) -> dict:
    options = {"engine": args.engine}
    if args.compute_type is not None:
        options["compute_type"] = args.compute_type
    if args.ct2_threads is not None:
        options["intra_threads"] = args.ct2_threads
    return options


def _export(args: argparse.Namespace) -> int:
    if args.format == "transformers":
        from tformer.convert import export_transformers  # import time (module docstring)

        out = export_transformers(args.checkpoint, args.output, force=args.force)
        print(f"exported to {out}")
        return 0
    from tformer.ct2 import export  # import time (module docstring)

    out = export(args.checkpoint, args.output, quantization=args.quantization, force=args.force)
    print(f"exported to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:

    from tformer.engines import load  # import time (module docstring)

    records = [("prompt", args.prompt)] if args.prompt is not None else \
        _read_inputs(args.input, args.field)
    options = _generation_options(args)  # seeds torch first: CTranslate2 seeds from it at load
    generator = load(args.checkpoint, device=args.device, **_engine_options(args))
    if args.chat:  # each text as a user message, the model's answer generated
        from tformer.data.sft import chat_prompts  # import time (module docstring)

        records = list(zip([rid for rid, _ in records],
                           chat_prompts(generator.tokenizer, [text for _, text in records])))
    if args.stream:
        return _stream(generator, [text for _, text in records], options)
    outputs = generator.generate([text for _, text in records], progress=True, **options)
    to_jsonl = args.output is not None and args.output.endswith((".jsonl", ".json"))
    lines = (
        json.dumps({"id": rid, "output": out}, ensure_ascii=False) if to_jsonl
        else out.replace("\n", " ")
        for (rid, _), out in zip(records, outputs)
    )
    if args.output is None:
        for line in lines:
            print(line)
    else:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.writelines(line + "\n" for line in lines)
    return 0


def _stream(generator, prompts: list[str], options: dict) -> int:
    """``--stream``: each prompt, then its continuation as it is generated (decoder-only)."""
    if generator.family != "causal":
        raise ValueError("--stream continues the prompt of a decoder-only model; this "
                         "checkpoint is an encoder-decoder")
    for prompt in prompts:
        print(prompt, end="", flush=True)
        generator.generate(prompt, on_text=lambda piece: print(piece, end="", flush=True),
                           **options)
        print(flush=True)
    return 0


def _read_inputs(path: str | None, field: str) -> list[tuple[str, str]]:
    """(id, text) pairs from a .txt file (one text per line), a .jsonl file (``field``), or
    standard input (text lines)."""

    from tformer.data import DataError  # import time (module docstring)

    if path is None or path == "-":
        lines, name = sys.stdin.read().splitlines(), "stdin"
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
        name = path
    records = []
    jsonl = name.endswith((".jsonl", ".json"))
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            records.append((str(number), line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}, line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{name}, line {number}: no string field {field!r}")
        records.append((str(record.get("id", number)), record[field]))
    if not records:
        raise DataError(f"{name}: no input texts")
    return records


def _evaluate(args: argparse.Namespace) -> int:

    from tformer.engines import load  # import time (module docstring)
    from tformer.evaluation import evaluate, is_chat_model

    options = _generation_options(args)  # seeds torch first: CTranslate2 seeds from it at load
    generator = load(args.checkpoint, device=args.device, **_engine_options(args))
    if generator.family == "causal" and not is_chat_model(generator):  # its loss on a text
        if getattr(generator, "model", None) is None:
            raise ValueError("tformer evaluate scores a language model's loss on a text, which "
                             "needs its PyTorch weights: evaluate the checkpoint this export "
                             f"came from, {generator.settings.get('source')}")
        from tformer.evaluation import evaluate_text  # import time (module docstring)

        metrics = evaluate_text(generator, args.data, output_dir=args.output_dir,
                                text_column=args.text_column, block_size=args.block_size)
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
        return 0
    metrics = evaluate(
        generator, args.data, output_dir=args.output_dir, source_column=args.source_column,
        target_column=args.target_column, prefix=args.prefix, language=args.language,
        moses_lang=args.moses,
        max_examples=args.max_examples, progress=True, **options,
    )
    shown = {k: v for k, v in metrics.items() if k != "generation"}
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    return 0


def _average(args: argparse.Namespace) -> int:

    # import time (module docstring)
    from tformer.training.average import average_checkpoints, last_checkpoints

    paths = args.checkpoints
    if len(paths) == 1 and (Path(paths[0]) / "checkpoints").is_dir():  # a run directory
        paths = last_checkpoints(paths[0], args.last)
    out = average_checkpoints(paths, args.output)
    print(f"averaged {len(paths)} checkpoints -> {out}")
    return 0


def _attention(args: argparse.Namespace) -> int:
    from tformer.visualization.export import write_attention  # import time (module docstring)

    files = write_attention(args.checkpoint, args.text, args.target, args.output_dir,
                            device=args.device, chat=args.chat, **_generation_options(args))
    print(f"interactive view: {files[0]}")
    print(f"{len(files) - 1} more files (maps as JSON, PNG heatmaps) in {files[0].parent}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tformer.visualization.report import write_report  # import time (module docstring)

    print(f"report: {write_report(args.run_dir, device=args.device)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tformer.serving import ServeSettings, resolve_api_key, serve  # import time (module docstring)

    names = ("host", "port", "batching", "batcher_process", "max_batch_size", "max_wait_ms",
             "max_queue", "max_inputs", "max_input_chars", "max_input_tokens", "max_new_tokens_cap",
             "default_max_new_tokens", "max_beams", "timeout_s", "model_name")
    settings = ServeSettings(api_key=resolve_api_key(args.api_key),
                             **{name: getattr(args, name) for name in names})
    serve(args.checkpoint, settings, device=args.device, **_engine_options(args))
    return 0


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    # import time (module docstring)
    from tformer.serving.settings import API_KEY_ENV, BATCHING, ServeSettings

    S = ServeSettings  # noqa: N806  (its class attributes are the defaults)
    p.add_argument("checkpoint", help="model directory with safetensors weights")
    p.add_argument("--host", default=S.host, help=f"bind address (default {S.host}: this "
                   "machine only; 0.0.0.0 exposes the model to the network)")
    p.add_argument("--port", type=int, default=S.port, help=f"default {S.port}")
    p.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer "
                   f"KEY or X-API-Key) on every route but /healthz; default: ${API_KEY_ENV}")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--model-name", default=None, help="the model's id on the OpenAI-compatible "
                   "routes (GET /v1/models, the model field); default: the checkpoint "
                   "directory's name")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--batching", choices=BATCHING, default=S.batching,
                   help="continuous: requests join the running batch at every step (greedy or "
                   "sampled; tformer's own models, encoder-decoder or decoder-only); "
                   "dynamic: one generate() per batch of requests; "
                   f"default {S.batching} (continuous where it applies)")
    g.add_argument("--batcher-process", action=argparse.BooleanOptionalAction,
                   default=S.batcher_process, help="run the batcher and its copy of the model "
                   "in a process of its own, beside the HTTP side's (see docs/serving.md); default "
                   "off")
    for flag, kind, help_ in [
        ("max-batch-size", int, "most texts decoded together"),
        ("max-wait-ms", float, "how long a dynamic batch waits for more requests"),
        ("max-queue", int, "most texts waiting (more: 503)"),
        ("max-inputs", int, "most texts in one request (more: 413)"),
        ("max-input-chars", int, "longest text in characters (413)"),
        ("max-input-tokens", int, "longest text in tokens (413)"),
        ("max-new-tokens-cap", int, "largest max_new_tokens a request may ask (422)"),
        ("default-max-new-tokens", int, "max_new_tokens of a request that does not say"),
        ("max-beams", int, "largest num_beams (422)"),
        ("timeout-s", float, "seconds a request may wait for its answer (504)"),
    ]:
        default = getattr(S, flag.replace("-", "_"))
        g.add_argument(f"--{flag}", type=kind, default=default, help=f"{help_}; default {default}")


def build_parser() -> argparse.ArgumentParser:
    from tformer.ct2 import QUANTIZATIONS  # import time (module docstring)

    parser = argparse.ArgumentParser(prog="tformer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="train a model from a recipe")
    p.add_argument("recipe", nargs="?", help="YAML recipe (omit for the defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.output_dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a train.output_dir that holds another run: delete its "
                   "checkpoints, tokenizer, metrics, config and report first (other files stay)")
    p.set_defaults(func=_train)

    p = verbs.add_parser("demo", help="train on the embedded docstring corpus and show results")
    p.add_argument("recipe", nargs="?", help="recipe (default: recipes/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=_demo)

    p = verbs.add_parser("data", help="the datasets the recipes use: list them, write a Hub "
                         "dataset into a local mirror, verify a mirror")
    p.add_argument("action", choices=["list", "write", "verify"])
    p.add_argument("names", nargs="*", help="dataset names (default: all)")
    p.add_argument("--to", default=None, help="write: the mirror directory (default: "
                   "$TFORMER_DATA_DIR)")
    p.add_argument("--dir", default=None, help="verify: the mirror directory (default: "
                   "$TFORMER_DATA_DIR)")
    p.set_defaults(func=_data)

    p = verbs.add_parser("generate", help="generate outputs for texts from a file or stdin")
    p.add_argument("checkpoint", help="model directory (own or Hugging Face) or Hub name")
    p.add_argument("--input", "-i", default=None, help=".txt (one text per line) or .jsonl; "
                   "default: stdin")
    p.add_argument("--field", default="source", help="JSONL field holding the text")
    p.add_argument("--prompt", default=None, help="one text to generate for, instead of "
                   "--input (a decoder-only model continues it; \"\" = from the start of a "
                   "document)")
    p.add_argument("--stream", action="store_true", help="decoder-only models: print each "
                   "prompt and its continuation as it is generated")
    p.add_argument("--chat", action="store_true", help="decoder-only models with a chat "
                   "template (data.task: sft): each text is a user message; print the answer")
    p.add_argument("--output", "-o", default=None, help=".txt or .jsonl (with ids); default: stdout")
    _add_generation_flags(p)
    _add_engine_flags(p)
    p.set_defaults(func=_generate)

    p = verbs.add_parser("export", help="write a checkpoint as a CTranslate2 model directory "
                         "(see docs/inference.md), or a decoder-only one as a plain transformers "
                         "GPT-2 / Llama directory (docs/model.md)")
    p.add_argument("checkpoint", help="model directory (own or Hugging Face) or Hub name")
    p.add_argument("--format", default="ctranslate2", choices=["ctranslate2", "transformers"],
                   help="ctranslate2 (default), or transformers: GPT2LMHeadModel / "
                   "LlamaForCausalLM of a gpt2 / llama preset checkpoint, loadable without tformer")
    p.add_argument("--quantization", default="float32", choices=QUANTIZATIONS,
                   help="CTranslate2's stored weight type: int8 for CPUs, float16 / int8_float16 "
                   "for GPUs (default float32)")
    p.add_argument("--output", "-o", default=None,
                   help="directory to write (default: ./NAME-ct2-QUANTIZATION, "
                   "./NAME-transformers)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_export)

    p = verbs.add_parser("average", help="average the weights of several checkpoints")
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories, or one run directory "
                   "(then its newest --last checkpoints)")
    p.add_argument("--last", type=int, default=5, help="with a run directory: how many")
    p.add_argument("--output", "-o", required=True, help="directory for the averaged model")
    p.set_defaults(func=_average)

    p = verbs.add_parser("attention", help="attention maps of one text: PNG heatmaps and an "
                         "interactive HTML view")
    p.add_argument("checkpoint", help="model directory (own or Hugging Face) or Hub name")
    p.add_argument("text", help="the source text (a decoder-only model: the prompt; \"\" = "
                   "from the start of a document)")
    p.add_argument("--target", default=None, help="the target text, a decoder-only model's "
                   "continuation (default: generate it)")
    p.add_argument("--chat", action="store_true", help="decoder-only models with a chat "
                   "template (data.task: sft): the text is a user message; the target its answer")
    p.add_argument("--output-dir", "-o", default="attention", help="default: ./attention")
    _add_generation_flags(p)
    p.set_defaults(func=_attention)

    p = verbs.add_parser("report", help="write RUN_DIR/report.html: config, data, curves, "
                         "predictions, attention")
    p.add_argument("run_dir", help="a training run directory (train.output_dir)")
    p.add_argument("--device", default=None, help="for the attention maps (default: cuda if "
                   "present)")
    p.set_defaults(func=_report)

    p = verbs.add_parser("serve", help="serve a model over HTTP: JSON API with dynamic "
                         "batching, and a web page (see docs/serving.md)")
    _add_serve_flags(p)
    _add_engine_flags(p)
    p.set_defaults(func=_serve)

    p = verbs.add_parser("evaluate", help="score a model on a file with references (a chat "
                         "model, data.task: sft: its answers to the sources); a decoder-only "
                         "model without a chat template: its loss and perplexity on a text")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="JSONL/CSV/TSV/Parquet with source and target "
                   "(a string or a list of reference strings); for a decoder-only model a .txt "
                   "file, a folder of them, or a file with --text-column")
    p.add_argument("--text-column", default="text", help="decoder-only: the field of a "
                   "document's text in a JSONL/CSV/Parquet file")
    p.add_argument("--block-size", type=int, default=None, help="decoder-only: the context each "
                   "token is predicted from (default: the one the model was trained on)")
    p.add_argument("--output-dir", default=None, help="write metrics.json and predictions.jsonl")
    p.add_argument("--source-column", default="source")
    p.add_argument("--target-column", default="target")
    p.add_argument("--prefix", default="", help="prepended to every source")
    p.add_argument("--language", default="auto", choices=["auto", "zh", "latin"],
                   help="zh: character ROUGE and sacreBLEU's zh tokenizer")
    p.add_argument("--moses", metavar="LANG", default=None,
                   help="also BLEU on lowercased, Moses-normalised and -tokenised text in "
                   "language LANG (e.g. de): the measure of older MT papers")
    p.add_argument("--max-examples", type=int, default=None)
    _add_generation_flags(p)
    _add_engine_flags(p)
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "recipe", None) and "=" in args.recipe:  # only overrides were given
        args.overrides, args.recipe = [args.recipe, *args.overrides], None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    from tformer.data import DataError  # import time (module docstring)
    from tformer.training import CheckpointError, ConfigError, RunDirError, TrainingError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError, RunDirError,
            FileNotFoundError, ValueError) as e:
        print(f"tformer {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
