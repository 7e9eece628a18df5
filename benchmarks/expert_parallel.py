"""Expert layer throughput in one process vs expert-parallel over 2 processes, and all-to-all share.

Times forward + backward of one THOR encoder layer (E experts, sentence routing) on the same
per-process batch:
* 1 process: all E experts local (fairseq_thor's grouped expert bank), all cores;
* W processes (gloo, one core each): E/W experts per process behind fairscale's MOELayer; the
  time spent inside ``all_to_all_single`` (forward and backward) is measured separately. Run twice,
  side by side: with our index dispatch (``IndexDispatchMoE``) and with fairscale's own einsum
  dispatch over the S x E x C mask (``--dispatch`` picks one).
Tokens/s of the W-process run counts the tokens of all processes. On one CPU machine the
processes share the cores, so this measures overheads (dispatch, exchange), not scaling.

    python benchmarks/expert_parallel.py [--experts 4 --tokens 2048 --dim 256 --ffn 1024]
Writes benchmarks/results/expert_parallel-e<E>.json.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from atomic_files import write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_layer(args, expert_parallel):
    from fairseq.models.transformer import TransformerConfig

    from fairseq_thor.models.expert_layers import ThorTransformerEncoderLayer
    from fairseq_thor.models.expert_options import ExpertSpec

    cfg = TransformerConfig()
    cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim = args.dim, args.ffn
    cfg.encoder.attention_heads = 4
    spec = ExpertSpec(num_experts=args.experts, layers=frozenset([0]), ffn_dim=None,
                      train_routing="sentence", inference_routing="sentence", inference_expert=0,
                      expert_parallel=expert_parallel)
    return ThorTransformerEncoderLayer(cfg, spec)


def time_steps(layer, args, after_warmup=lambda: None):
    seq_len = 32
    x = torch.randn(seq_len, args.tokens // seq_len, args.dim, requires_grad=True)
    for _ in range(args.warmup):
        layer(x, None).sum().backward()
    after_warmup()
    start = time.perf_counter()
    for _ in range(args.steps):
        layer(x, None).sum().backward()
    return (time.perf_counter() - start) / args.steps


def one_process(args):
    torch.set_num_threads(args.world_size)
    torch.manual_seed(0)
    seconds = time_steps(build_layer(args, expert_parallel=False), args)
    return {"processes": 1, "threads": args.world_size, "step_s": seconds,
            "tokens_per_s": args.tokens / seconds}


def rank_main(rank, args, port, results, dispatch):
    torch.set_num_threads(1)
    if dispatch == "einsum":  # fairscale's MOELayer.forward, as before IndexDispatchMoE
        from fairscale.nn.moe import MOELayer

        from fairseq_thor.modules.expert_parallel_ffn import IndexDispatchMoE
        IndexDispatchMoE.forward = MOELayer.forward
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world_size)
    exchange = {"seconds": 0.0}
    all_to_all = dist.all_to_all_single

    def timed_all_to_all(*a, **kw):  # instrument the exchange fairscale's MOELayer makes
        start = time.perf_counter()
        out = all_to_all(*a, **kw)
        exchange["seconds"] += time.perf_counter() - start
        return out

    dist.all_to_all_single = timed_all_to_all
    torch.manual_seed(0)
    layer = build_layer(args, expert_parallel=True)
    seconds = time_steps(layer, args, after_warmup=lambda: exchange.update(seconds=0.0))
    results[rank] = (seconds, exchange["seconds"] / args.steps)
    dist.destroy_process_group()


def many_processes(args, dispatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(args, port, results, dispatch), nprocs=args.world_size, join=True)
    step = max(r[0] for r in results.values())
    exchange = sum(r[1] for r in results.values()) / args.world_size
    return {"processes": args.world_size, "threads": 1, "step_s": step,
            "tokens_per_s": args.world_size * args.tokens / step,
            "all_to_all_s": exchange, "all_to_all_share": exchange / step}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per process and step")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dispatch", choices=["both", "index", "einsum"], default="both",
                        help="expert-parallel dispatch to time (default: both, side by side)")
    args = parser.parse_args()
    import fairseq_thor  # noqa: F401  (registers the plugin; quiet imports before timing)

    single = one_process(args)
    dispatches = ["index", "einsum"] if args.dispatch == "both" else [args.dispatch]
    sharded = {d: many_processes(args, d) for d in dispatches}
    print(f"expert layer, E={args.experts}, d={args.dim}, ffn={args.ffn}, "
          f"{args.tokens} tokens per process, forward+backward")
    print(f"{'run':<34}{'step (ms)':>11}{'tokens/s':>11}{'all-to-all':>12}{'ratio':>8}")
    print(f"{'1 process, ' + str(single['threads']) + ' threads':<34}{1000 * single['step_s']:>11.1f}"
          f"{single['tokens_per_s']:>11.0f}{'-':>12}{1:>8.2f}")
    for dispatch, run in sharded.items():
        run["ratio"] = run["tokens_per_s"] / single["tokens_per_s"]
        print(f"{f'{args.world_size} processes x 1 thread, {dispatch}':<34}{1000 * run['step_s']:>11.1f}"
              f"{run['tokens_per_s']:>11.0f}{100 * run['all_to_all_share']:>11.1f}%{run['ratio']:>8.2f}")
    print(f"ratio {args.world_size}-process / 1-process tokens/s: "
          + ", ".join(f"{d} dispatch {r['ratio']:.2f}" for d, r in sharded.items()) + " (aim >= 0.9)")
    out = os.path.join(REPO, "benchmarks", "results", f"expert_parallel-e{args.experts}.json")
    write_json(out, {"args": vars(args), "one_process": single, "expert_parallel": sharded})  # never half a file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
