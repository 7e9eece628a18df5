"""Serving speed, side by side: fairseq-generate on THOR, on its dense export, and CTranslate2.

Four ways to decode one model's test set with the same beam, length limits, batch size and threads:

* ``thor-path``: fairseq-generate with the plugin, ``--inference-routing path`` (THOR's cheapest
  routing: batches grouped by the sentences' expert);
* ``dense``: stock fairseq-generate on ``fairseq-thor-export-dense --expert K``;
* ``ct2-float32``, ``ct2-int8``: ``fairseq-thor-export-ctranslate2`` and its translator.

At each thread count (1 and 2 by default) the systems run one after the other, the same round
repeated ``--rounds`` times (the median is kept), so machine noise hits them alike. Measured: the
decoding alone (fairseq's own "Translated N sentences (M tokens) in Xs" timer; the time of
``Translator.translate_tokens`` for CTranslate2; loading a model is not counted), as sentences/s and
target tokens/s (EOS included, as fairseq counts them), the speed-up over ``thor-path``, the share
of hypotheses identical to stock fairseq-generate's on the dense export (parity), and with
``--references`` detokenized sacreBLEU.

    python benchmarks/serving.py --checkpoint work/demo/checkpoints/checkpoint_last.pt   # make demo's model
    python benchmarks/serving.py --base           # the base size (make bench runs both)

Without ``--data`` the test split is make demo's (the gettext de->en corpus, built under ``--work``
like the demo builds it: the same split and sentencepiece model).

``--base`` measures a base-size THOR model (d=512, FFN 2048, 8 heads, 6+6 layers, E=2) made by one
training update on ``--data`` (its weights are close to random: speed only), decoded to a fixed
length (``--min-len 30 --max-len-b 30``) so that every system emits the same number of tokens.
Writes ``benchmarks/results/serving.json`` (``serving-base.json``) and prints the table.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from cli_runs import (BIN, USER_DIR, build_corpus, child_env, quiet_plugin_import, run,  # noqa: E402
                      sacrebleu_scores, scratch_root)
from fairseq_logs import parse_generate_log  # noqa: E402
from atomic_files import write_json  # noqa: E402

SYSTEMS = ["thor-path", "dense", "ct2-float32", "ct2-int8"]
TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s")
BASE = ["--encoder-layers", "6", "--decoder-layers", "6", "--encoder-embed-dim", "512", "--decoder-embed-dim", "512",
        "--encoder-ffn-embed-dim", "2048", "--decoder-ffn-embed-dim", "2048", "--encoder-attention-heads", "8",
        "--decoder-attention-heads", "8", "--num-experts", "2"]


def fairseq_generate(args, checkpoint: str, threads: int, plugin: bool) -> dict:
    cmd = [os.path.join(BIN, "fairseq-generate"), args.data, "--cpu", "--path", checkpoint, "--gen-subset", "test",
           "--beam", str(args.beam), "--batch-size", str(args.batch_size), "--required-batch-size-multiple", "1",
           "--max-len-a", str(args.max_len_a), "--max-len-b", str(args.max_len_b), "--min-len", str(args.min_len),
           "--seed", "1", *(["--remove-bpe", "sentencepiece"] if args.spm else [])]
    if plugin:
        cmd += ["--user-dir", USER_DIR, "--task", "translation_thor", "--inference-routing", "path"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(threads), text=True, capture_output=True)
    text = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"fairseq-generate failed:\n{text[-3000:]}")
    sentences, tokens, seconds = TRANSLATED.search(text).groups()
    return {"sentences": int(sentences.replace(",", "")), "target_tokens": int(tokens.replace(",", "")),
            "seconds": float(seconds), "hypotheses": parse_generate_log(text)["hypotheses"]}


def ctranslate2(args, model_dir: str, threads: int, pieces: List[List[str]]) -> dict:
    from fairseq_thor.serving.translator import Translator

    translator = Translator(model_dir, threads=threads, max_batch_size=args.batch_size)
    start = time.perf_counter()
    out = translator.translate_tokens(pieces)
    seconds = time.perf_counter() - start
    joined = ["".join(p).replace("\u2581", " ").strip() if args.spm else " ".join(p) for p in out]
    return {"sentences": len(out), "target_tokens": sum(len(p) + 1 for p in out), "seconds": seconds,
            "hypotheses": joined}


def base_checkpoint(args, work: str) -> str:
    """A base-size THOR model after one update on ``args.data`` (speed only)."""
    save = os.path.join(work, "base")
    run([os.path.join(BIN, "fairseq-train"), args.data, "--user-dir", USER_DIR, "--cpu", "--task", "translation_thor",
         "--arch", "thor_transformer", "--share-all-embeddings", *BASE, "--criterion", "thor_consistency",
         "--optimizer", "adam", "--lr", "1e-4", "--max-tokens", "2048", "--max-update", "1", "--save-dir", save,
         "--no-epoch-checkpoints", "--disable-validation"], os.path.join(work, "base-train.log"), env=child_env(None))
    return os.path.join(save, "checkpoint_last.pt")


def exports(args, checkpoint: str, work: str) -> Dict[str, str]:
    dense = os.path.join(work, "dense.pt")
    run([os.path.join(BIN, "fairseq-thor-export-dense"), checkpoint, "--out", dense, "--expert", str(args.expert)],
        os.path.join(work, "export-dense.log"), env=child_env(None))
    paths = {"dense": dense}
    for quantization in ("float32", "int8"):
        out = os.path.join(work, f"ct2-{quantization}")
        run([os.path.join(BIN, "fairseq-thor-export-ctranslate2"), checkpoint, "--data-dir", args.data, "--out", out,
             "--expert", str(args.expert), "--quantization", quantization, "--beam", str(args.beam),
             "--max-len-a", str(args.max_len_a), "--max-len-b", str(args.max_len_b), "--min-len", str(args.min_len)],
            os.path.join(work, f"export-{quantization}.log"), env=child_env(None))
        paths[f"ct2-{quantization}"] = out
    return paths


def source_pieces(args) -> List[List[str]]:
    import sentencepiece

    with open(args.source, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if not args.spm:
        return [line.split() for line in lines]
    sp = sentencepiece.SentencePieceProcessor(model_file=args.spm)
    return [sp.encode(line, out_type=str) for line in lines]


def measure(args) -> dict:
    quiet_plugin_import()
    work = tempfile.mkdtemp(prefix="serving-", dir=scratch_root())
    try:
        checkpoint = base_checkpoint(args, work) if args.base else args.checkpoint
        paths = exports(args, checkpoint, work)
        pieces = source_pieces(args)
        references = None
        if args.references:
            with open(args.references, encoding="utf-8") as f:
                references = [line.rstrip("\n") for line in f]
        results = {}
        for threads in args.threads:
            runs = {name: [] for name in SYSTEMS}
            for _ in range(args.rounds):
                for name in SYSTEMS:
                    if name == "thor-path":
                        runs[name].append(fairseq_generate(args, checkpoint, threads, plugin=True))
                    elif name == "dense":
                        runs[name].append(fairseq_generate(args, paths["dense"], threads, plugin=False))
                    else:
                        runs[name].append(ctranslate2(args, paths[name], threads, pieces))
            results[threads] = summarize(runs, references)
        return {"settings": {k: v for k, v in vars(args).items()}, "results": results}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarize(runs: Dict[str, List[dict]], references) -> dict:
    rows = {}
    for name, measured in runs.items():
        seconds = statistics.median(m["seconds"] for m in measured)
        first = measured[0]
        row = {"sentences": first["sentences"], "target_tokens": first["target_tokens"], "seconds": round(seconds, 3),
               "sentences_per_s": round(first["sentences"] / seconds, 2),
               "tokens_per_s": round(first["target_tokens"] / seconds, 1),
               "seconds_each_round": [round(m["seconds"], 3) for m in measured]}
        if references is not None:
            row.update(sacrebleu_scores(first["hypotheses"], references))
        rows[name] = row
    base = rows["thor-path"]["tokens_per_s"]
    dense = runs["dense"][0]["hypotheses"]
    for name, row in rows.items():
        row["speedup_tokens_per_s"] = round(row["tokens_per_s"] / base, 2)
        # parity: the share of hypotheses that are exactly the stock fairseq-generate ones
        same = sum(a == b for a, b in zip(runs[name][0]["hypotheses"], dense))
        row["identical_to_dense"] = round(same / len(dense), 4)
    return rows


def table(result: dict) -> str:
    lines = ["| threads | system | sentences/s | target tokens/s | x thor-path | BLEU | chrF2 | same as dense |",
             "|---|---|---|---|---|---|---|---|"]
    for threads, rows in result["results"].items():
        for name, r in rows.items():
            lines.append(f"| {threads} | {name} | {r['sentences_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['speedup_tokens_per_s']:.2f} | {r.get('bleu', '—')} | {r.get('chrf', '—')} | "
                         f"{100 * r['identical_to_dense']:.1f}% |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a THOR checkpoint (not with --base)")
    p.add_argument("--base", action="store_true", help="a base-size model after one update (speed only)")
    p.add_argument("--data", help="the fairseq-preprocess folder of the test split (default: make demo's corpus, "
                                  "built under --work, with its --source, --spm and --references)")
    p.add_argument("--source", help="the test split's source text (raw, one sentence per line)")
    p.add_argument("--spm", help="the sentencepiece model the data was encoded with")
    p.add_argument("--references", help="raw target text: adds BLEU/chrF2")
    p.add_argument("--work", default=os.path.join(REPO, "work", "serving"), help="where the default corpus goes")
    p.add_argument("--expert", default="0", help="the exports' --expert (default 0)")
    p.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per thread count; the median time is kept")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch, every system")
    p.add_argument("--max-len-a", type=float, default=None, help="default 1.5 (0 with --base)")
    p.add_argument("--max-len-b", type=int, default=None, help="default 10 (30 with --base)")
    p.add_argument("--min-len", type=int, default=None, help="default 1 (30 with --base)")
    p.add_argument("--out", help="default benchmarks/results/serving.json (serving-base.json with --base)")
    args = p.parse_args(argv)
    if bool(args.base) == bool(args.checkpoint):
        p.error("give --checkpoint or --base")
    if args.data and not args.source:
        p.error("--data needs --source (the raw test source text)")
    if not args.data:  # make demo's gettext de->en corpus, 8k joint sentencepiece
        corpus = argparse.Namespace(work=args.work, vocab=8000, src="de", tgt="en")
        args.data = build_corpus(corpus)
        raw = os.path.dirname(corpus.reference_file)
        args.source, args.references = os.path.join(raw, "test.de"), corpus.reference_file
        args.spm = os.path.join(args.work, "data", "spm-8000", "spm.model")
    fixed = dict(max_len_a=0.0, max_len_b=30, min_len=30) if args.base else dict(max_len_a=1.5, max_len_b=10, min_len=1)
    for key, value in fixed.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.threads = [int(t) for t in args.threads.split(",")]
    name = "serving-base.json" if args.base else "serving.json"
    args.out = args.out or os.path.join(REPO, "benchmarks", "results", name)
    return args


def main(argv=None):
    args = parse_args(argv)
    result = measure(args)
    print(table(result))
    write_json(args.out, result)  # never half a file
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
