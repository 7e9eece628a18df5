"""Training and decoding through the plugin's real CLIs, for ``quality.py`` and its cells.

A logged subprocess, the gettext corpus of ``make demo``, the model-size and decoding flags, one
checkpoint decoded and scored (every test sentence, or an error), and the active parameters per
token read from a checkpoint. Log parsing and the tables live in ``compare_logs.py``.
"""
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from typing import Dict, List, Optional

import fairseq_logs as logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_thor")
BIN = os.path.dirname(sys.executable)  # fairseq's CLIs next to this python (the venv)
# the gated baselines' training flags (Switch, GShard, hash)
GATED = ["--capacity-factor", "{capacity_factor}", "--criterion", "moe_label_smoothed_cross_entropy",
         "--moe-aux-loss-weight", "0.01"]
DATA_LAYOUT = ("a fairseq-preprocess output folder: dict.SRC.txt, dict.TGT.txt and "
               "{train,valid,test}.SRC-TGT.{SRC,TGT}.bin/.idx")


def step(message: str):
    print(f"\n==> [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def exit_on_sigterm():
    """Make ``kill PID`` of a benchmark unwind like Ctrl-C, so that ``run`` stops its child too.

    By default SIGTERM ends Python at once, skipping ``finally``: the fairseq-train it started
    kept training, orphaned, and a rerun of the study then had two trainings writing one cell's
    checkpoints. Only the main thread may set a handler, and one set by the caller is kept."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run(cmd, log_path: str, echo=lambda line: None, env=None) -> str:
    """Run ``cmd`` from the repository root and save its output; prints what ``echo`` makes of
    a line (when not None); raises with the output's tail if it fails."""
    exit_on_sigterm()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    try:
        # line-buffered: a run killed from outside (a study interrupted) keeps its log up to the kill
        with open(log_path, "w", encoding="utf-8", buffering=1) as log:
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                shown = echo(line)
                if shown is not None:
                    print("    " + shown, flush=True)
    finally:
        if proc.poll() is None:  # leaving on Ctrl-C or a kill: the training goes with us
            proc.terminate()
            proc.wait()
    if proc.wait() != 0:
        raise RuntimeError(f"{os.path.basename(str(cmd[0]))} exited {proc.returncode}; "
                           f"log {log_path}:\n" + "".join(lines[-25:]))
    return "".join(lines)


def scratch_root() -> str:
    """``work/`` of this checkout, for the temporary folders of a benchmark (made if missing: a
    fresh clone has none); work/ is ignored by git and on the same disk as the checkpoints."""
    root = os.path.join(REPO, "work")
    os.makedirs(root, exist_ok=True)
    return root


def child_env(threads: Optional[int]) -> dict:
    """The CLIs' environment: unbuffered, without fairscale's import noise, and ``threads``
    OpenMP/MKL threads when given (e.g. 1 on a shared machine: oversubscribed torch threads crawl)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    quiet_plugin_import()
    from fairseq_thor.compat import QUIET_FAIRSCALE

    # fairscale's import-time deprecation warnings would open every log (fairseq_thor/compat.py)
    env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), QUIET_FAIRSCALE) if w)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def build_corpus(args) -> str:
    """The gettext corpus, sentencepiece and fairseq-preprocess exactly as examples/demo/run.sh
    (each step skipped when its output exists) under ``args.work``; sets ``args.reference_file``
    to the raw (detokenized) test targets."""
    vocab = getattr(args, "vocab", 4000)  # joint sentencepiece size; make demo uses 8000
    raw, spm, data = (os.path.join(args.work, "data", d) for d in ("raw", f"spm-{vocab}", f"data-bin-{vocab}"))
    os.makedirs(data, exist_ok=True)
    src, tgt = args.src, args.tgt
    if not os.path.exists(os.path.join(raw, f"test.{tgt}")):
        step(f"building a {src}->{tgt} corpus from gettext catalogs")
        run([sys.executable, "-m", "fairseq_thor.corpus.gettext_pairs", "--src", src, "--tgt", tgt,
             "--out", raw], os.path.join(args.work, "data", "corpus.log"))
    if not os.path.exists(os.path.join(spm, f"test.{tgt}")):
        step(f"sentencepiece (joint, {vocab} unigram)")
        run([sys.executable, "examples/demo/prepare_spm.py", "--raw", raw, "--out", spm, "--src", src,
             "--tgt", tgt, "--vocab-size", str(vocab)], os.path.join(args.work, "data", "spm.log"))
    if not os.path.exists(os.path.join(data, f"dict.{tgt}.txt")):
        step("fairseq-preprocess")
        run([os.path.join(BIN, "fairseq-preprocess"), "--source-lang", src, "--target-lang", tgt,
             "--joined-dictionary", "--workers", "2", "--trainpref", f"{spm}/train",
             "--validpref", f"{spm}/valid", "--testpref", f"{spm}/test", "--destdir", data],
            os.path.join(args.work, "data", "preprocess.log"))
    args.reference_file = os.path.join(raw, f"test.{tgt}")
    return data


def data_problem(data: str) -> Optional[str]:
    """What is wrong with a binarized data folder for training and decoding its test split."""
    if not os.path.isdir(data):
        return "no such folder"
    missing = [pattern for pattern in ("dict.*.txt", "train.*-*.*.idx", "valid.*-*.*.idx", "test.*-*.*.idx")
               if not glob.glob(os.path.join(data, pattern))]
    return f"no {', '.join(missing)} in it" if missing else None


def quiet_plugin_import():
    """Import the plugin (so fairseq and fairscale) into a driver without their import-time
    noise (fairscale's deprecation warnings, fairseq's INFO lines): the CLIs' logs say it all."""
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fairseq_thor  # noqa: F401


def count_sentences(data: str, split: str = "test") -> int:
    """Sentences in a binarized split (the target side's dataset), read with fairseq's loader."""
    quiet_plugin_import()
    from fairseq.data import data_utils

    prefix = sorted(glob.glob(os.path.join(data, f"{split}.*-*.*.idx")))[-1][:-len(".idx")]
    return len(data_utils.load_indexed_dataset(prefix, None))


def model_flags(args, num_experts: int) -> list:
    """A ``thor_transformer`` of ``args``' sizes with shared embeddings and ``num_experts``."""
    d, f, L, H = args.embed_dim, args.ffn_dim, args.layers, args.heads
    return ["--arch", "thor_transformer", "--share-all-embeddings",
            "--encoder-layers", L, "--decoder-layers", L, "--encoder-embed-dim", d, "--decoder-embed-dim", d,
            "--encoder-ffn-embed-dim", f, "--decoder-ffn-embed-dim", f,
            "--encoder-attention-heads", H, "--decoder-attention-heads", H, "--num-experts", num_experts]


def generate_command(args, checkpoint: str, extra=(), plugin: bool = True) -> list:
    """fairseq-generate on the test split, beam 5; ``plugin=False``: stock fairseq (a dense export),
    which needs ``--required-batch-size-multiple 1`` to decode every sentence."""
    task = ["--user-dir", USER_DIR, "--task", "translation_thor"] if plugin else ["--required-batch-size-multiple", "1"]
    return [str(arg) for arg in [
        os.path.join(BIN, "fairseq-generate"), args.data, *task, *args.device_flags,
        "--path", checkpoint, "--gen-subset", "test", "--beam", "5",
        "--max-tokens", "8000", "--max-len-a", "1.5", "--max-len-b", "10", "--seed", args.seed,
        *(["--remove-bpe", args.remove_bpe] if args.remove_bpe != "none" else []), *extra,
    ]]


def decode(args, checkpoint: str, log_path: str, env: dict, extra=(), plugin: bool = True,
           keep_texts: bool = False) -> dict:
    """Decode the test split with beam 5 and score it with detokenized sacreBLEU (BLEU, chrF2)
    against ``args.reference_file`` or fairseq's ``T-`` lines; raises unless every test sentence
    has a hypothesis. ``keep_texts``: the result also holds the hypotheses and references scored."""
    cmd = generate_command(args, checkpoint, extra, plugin)
    decoded = logs.parse_generate_log(run(cmd, log_path, env=env))
    hypotheses, references = decoded.pop("hypotheses"), decoded.pop("references")
    expected = count_sentences(args.data)
    if len(hypotheses) != expected:
        raise RuntimeError(f"fairseq-generate wrote {len(hypotheses)} hypotheses for {expected} test "
                           f"sentences; log {log_path}")
    if args.reference_file:
        with open(args.reference_file, encoding="utf-8") as f:
            references = [line.rstrip("\n") for line in f]
    texts = {"hypotheses": hypotheses, "references": references} if keep_texts else {}
    return {**sacrebleu_scores(hypotheses, references), **decoded, "generate_command": cmd, **texts}


def count_params(checkpoint: str, total_params: int, num_experts: int, experts_per_token: int) -> dict:
    """Expert FFN parameters and active parameters per token, from the checkpoint's tensors."""
    import torch

    quiet_plugin_import()
    from fairseq_thor.compat import allow_fairseq_checkpoint_globals

    allow_fairseq_checkpoint_globals()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    expert = expert_ffn_numel(state, num_experts)
    if num_experts > 1 and not expert:
        raise RuntimeError("no expert FFN tensors (fc1/fc2 of shape (E, ...)) in the checkpoint: "
                           "cannot count active parameters")
    return {"expert_ffn_params": expert,
            "active_params": active_params(total_params, expert, num_experts, experts_per_token)}


def sacrebleu_scores(hypotheses: List[str], references: List[str]) -> Dict[str, float]:
    import sacrebleu

    if len(hypotheses) != len(references):  # a partial score would look like a real one
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    # the brevity penalty and length ratio tell a short or run-on output from a wrong one
    return {"bleu": round(bleu.score, 2), "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
            "bleu_bp": round(bleu.bp, 3), "length_ratio": round(bleu.sys_len / max(1, bleu.ref_len), 3)}


def expert_ffn_numel(state_dict: dict, num_experts: int) -> int:
    """Elements of the expert FFN banks: ``fc1``/``fc2`` weights ``(E, out, in)`` and biases
    ``(E, out)`` (a dense layer's ``fc1.weight`` is 2-D and is not counted)."""
    if num_experts < 2:
        return 0
    total = 0
    for name, tensor in state_dict.items():
        m = re.search(r"\.fc[12]\.(weight|bias)$", name)
        if m and tensor.dim() == (3 if m.group(1) == "weight" else 2) and tensor.size(0) == num_experts:
            total += tensor.numel()
    return total

def active_params(total: int, expert_numel: int, num_experts: int, experts_per_token: int) -> int:
    """Parameters one token runs through: everything outside the expert banks (embeddings,
    attention, gates) plus ``experts_per_token`` of the ``num_experts`` experts of each bank."""
    if num_experts < 2:
        return total
    return total - expert_numel + expert_numel * experts_per_token // num_experts
