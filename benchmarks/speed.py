"""Training and decoding speed of THOR against a dense transformer of the same active size.

Measured side by side in one process on the same synthetic batches (speed does not depend on
what the tokens mean), alternating the models so that machine noise hits them alike:

* training words/s: THOR (E experts, two stochastic passes + consistency) over dense (one pass of
  label-smoothed CE), with the two passes as two calls and fused into one (``--fuse-passes``); two
  passes of a dense step's cost would make 0.5 the ceiling, which THOR's cheaper loss
  (modules/two_pass_loss) gets past on CPU and fusing may pass where one pass leaves a GPU underused;
* training words/s of R-Drop on the dense model, as fairseq ships it (its criterion doubles the
  batch and takes the KL from two more full-vocabulary softmaxes) and as the same terms computed by
  ``thor_consistency`` on the dense model (two calls, the plugin's blockwise loss): the convergence
  study's R-Drop row pays fairseq's implementation, and this shows how much of it is the loss;
* decoding tokens/s: beam search with THOR at E = 1, 4, 16 (sentence routing, only the chosen
  expert computed) over dense; the aim is >= 0.9 at every E. ``--inference-routing path`` times
  the batches that routing decodes: the THOR tasks group sentences by their path expert, so the
  batch holds sentences that share one (ids picked accordingly).

    python benchmarks/speed.py                      # defaults: d=256, 3+3 layers, CPU
    python benchmarks/speed.py --embed-dim 512 --layers 6 --device cuda --precision fp16

Prints a table and writes benchmarks/results/speed.json.
"""
import argparse
import os
import statistics
import time

import torch
from fairseq import options
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.criterions.label_smoothed_cross_entropy_with_rdrop import RdropLabelSmoothedCrossEntropyCriterion
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.sequence_generator import SequenceGenerator

import fairseq_thor  # noqa: E402
from fairseq_thor.criterions.thor_consistency import FUSABLE_ROUTING, ThorConsistencyCriterion  # noqa: E402
from fairseq_thor.modules.routing import PATH_SALT, keyed_sentence_experts  # noqa: E402
from atomic_files import write_json  # noqa: E402


class DictTask:
    def __init__(self, d):
        self.source_dictionary = self.target_dictionary = d


def build(arch, args, dictionary, extra=()):
    size = ["--encoder-layers", str(args.layers), "--decoder-layers", str(args.layers),
            "--encoder-embed-dim", str(args.embed_dim), "--decoder-embed-dim", str(args.embed_dim),
            "--encoder-ffn-embed-dim", str(4 * args.embed_dim),
            "--decoder-ffn-embed-dim", str(4 * args.embed_dim),
            "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
            "--share-all-embeddings", "--dropout", "0.1"]
    ns = options.parse_args_and_arch(options.get_training_parser(),
                                     ["x", "--arch", arch, "--user-dir", fairseq_thor.__path__[0],
                                      *size, *extra])
    model = ARCH_MODEL_REGISTRY[arch].build_model(ns, DictTask(dictionary))
    return model.to(device=args.device, dtype=PRECISIONS[args.precision])


def batch(dictionary, args, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = dictionary.nspecial, len(dictionary)
    src = torch.randint(lo, hi, (args.batch_size, args.length), generator=g)
    tgt = torch.randint(lo, hi, (args.batch_size, args.length), generator=g)
    src[:, -1] = tgt[:, -1] = dictionary.eos()
    prev = torch.cat([tgt[:, -1:], tgt[:, :-1]], dim=1)
    return {"net_input": {"src_tokens": src.to(args.device),
                          "src_lengths": torch.full((args.batch_size,), args.length, device=args.device),
                          "prev_output_tokens": prev.to(args.device)},
            "target": tgt.to(args.device), "ntokens": tgt.numel()}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_training(model, criterion, sample, args):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def step():
        optimizer.zero_grad()
        # a fresh net_input dict: fairseq's R-Drop criterion replaces its tensors with doubled ones
        loss, _, _ = criterion(model, {**sample, "net_input": dict(sample["net_input"])})
        loss.backward()
        optimizer.step()

    step()  # warm-up
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    sync(args.device)
    return sample["ntokens"] * args.train_steps / (time.perf_counter() - start)


def one_path_group(num_experts: int, batch_size: int) -> torch.Tensor:
    """``batch_size`` sentence ids whose path expert is the same: a batch as grouped by the task."""
    ids = torch.arange(batch_size * num_experts * 4)
    experts = keyed_sentence_experts(ids, PATH_SALT, torch.initial_seed(), num_experts)
    return ids[experts == 0][:batch_size]


@torch.no_grad()
def time_decoding(model, dictionary, sample, args):
    model.eval()
    if args.inference_routing == "path" and hasattr(model, "set_sentence_keys"):
        model.set_sentence_keys(one_path_group(model.args.num_experts, args.batch_size))
    # min_len = max_len: every model emits exactly args.decode_length tokens per hypothesis
    gen = SequenceGenerator([model], dictionary, beam_size=args.beam, max_len_a=0,
                            max_len_b=args.decode_length, min_len=args.decode_length)
    net_input = {k: v for k, v in sample["net_input"].items() if k != "prev_output_tokens"}
    gen.generate([model], {"net_input": net_input})  # warm-up
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.decode_repeats):
        gen.generate([model], {"net_input": net_input})
    sync(args.device)
    tokens = args.batch_size * args.decode_length * args.decode_repeats
    return tokens / (time.perf_counter() - start)


def interleaved(measure, names, rounds):
    """Median of `rounds` measurements per name, taken round-robin."""
    results = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            results[n].append(measure(n))
    return {n: statistics.median(v) for n, v in results.items()}


# half precision as fairseq's --fp16/--bf16 train: the model's weights in that dtype
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_size_args(p: argparse.ArgumentParser):
    """Model and batch sizes and the weights' precision, shared with benchmarks/memory.py."""
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    p.add_argument("--length", type=int, default=20, help="tokens per sentence")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="dtype of the weights and activations (fp16/bf16: with --device cuda)")


def synthetic_dictionary(vocab: int) -> Dictionary:
    dictionary = Dictionary()
    for i in range(vocab - dictionary.nspecial):
        dictionary.add_symbol(f"w{i}")
    return dictionary


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_args(p)
    p.add_argument("--train-experts", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--train-routing", default="sentence", choices=["batch", "sentence", "token"])
    p.add_argument("--inference-routing", default="sentence", choices=["sentence", "token", "batch", "path"])
    p.add_argument("--decode-experts", default="1,4,16")
    p.add_argument("--decode-length", type=int, default=20)
    p.add_argument("--decode-repeats", type=int, default=2)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "speed.json"))
    args = p.parse_args()

    torch.manual_seed(0)
    dictionary = synthetic_dictionary(args.vocab)
    sample = batch(dictionary, args, seed=0)
    print(f"device={args.device} {args.precision} d={args.embed_dim} layers={args.layers}+{args.layers} "
          f"vocab={len(dictionary)} batch={args.batch_size}x{args.length} tokens", flush=True)

    # --- training ---
    task = DictTask(dictionary)
    dense = build("transformer", args, dictionary)
    thor = build("thor_transformer", args, dictionary, ["--num-experts", str(args.train_experts),
                                                        "--expert-routing", args.train_routing])
    thor_name, fused_name = f"thor E={args.train_experts}", f"thor E={args.train_experts} fused"
    setups = {
        "dense": (dense, LabelSmoothedCrossEntropyCriterion(task, False, 0.1)),
        thor_name: (thor, ThorConsistencyCriterion(task, False, 0.1, 1.0)),
    }
    setups["R-Drop fairseq"] = (dense, RdropLabelSmoothedCrossEntropyCriterion(task, False, 0.1, rdrop_alpha=1.0))
    setups["R-Drop our loss"] = (dense, ThorConsistencyCriterion(task, False, 0.1, 1.0))  # same terms, our loss
    if args.train_routing in FUSABLE_ROUTING:  # --fuse-passes: one forward over the stacked batch
        setups[fused_name] = (thor, ThorConsistencyCriterion(task, False, 0.1, 1.0, fuse_passes=True))
    train = interleaved(lambda n: time_training(*setups[n], sample, args), list(setups), args.rounds)
    train_ratio = train[thor_name] / train["dense"]
    fused_ratio = train[fused_name] / train["dense"] if fused_name in train else None

    # --- decoding ---
    models = {"dense": dense}
    for e in (int(x) for x in args.decode_experts.split(",")):
        models[f"thor E={e}"] = build("thor_transformer", args, dictionary,
                                      ["--num-experts", str(e), "--inference-routing", args.inference_routing])
    decode = interleaved(lambda n: time_decoding(models[n], dictionary, sample, args), list(models),
                         args.rounds)

    print(f"\n{'training':<16}{'words/s':>10}{'ratio':>8}   ({args.train_routing} routing)")
    for name, wps in train.items():
        print(f"{name:<16}{wps:>10.0f}{wps / train['dense']:>8.2f}")
    print(f"\n{'decoding':<14}{'tokens/s':>10}{'ratio':>8}   (beam {args.beam}, {args.inference_routing} routing)")
    for name, tps in decode.items():
        print(f"{name:<14}{tps:>10.0f}{tps / decode['dense']:>8.2f}")
    decode_ratios = {n: v / decode["dense"] for n, v in decode.items() if n != "dense"}
    fused = "" if fused_ratio is None else f", fused {fused_ratio:.2f}"
    rdrop_cost = {n: train["dense"] / train[n] for n in ("R-Drop fairseq", "R-Drop our loss")}
    print(f"\nR-Drop costs {rdrop_cost['R-Drop fairseq']:.2f}x dense per word with fairseq's criterion, "
          f"{rdrop_cost['R-Drop our loss']:.2f}x with the same terms through thor_consistency")
    print(f"\ntraining ratio {train_ratio:.2f}{fused} (aim >= 0.47); "
          f"lowest decoding ratio {min(decode_ratios.values()):.2f} (aim >= 0.90)")

    result = {"config": vars(args), "train_words_per_s": train, "train_ratio": train_ratio,
              "train_ratio_fused": fused_ratio, "rdrop_cost_vs_dense": rdrop_cost,
              "decode_tokens_per_s": decode, "decode_ratios": decode_ratios}
    write_json(args.out, result)  # never half a file
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
