"""Reading fairseq's logs (for ``compare.py`` and ``quality.py``) and writing compare's table.

Parsers work on the text fairseq prints with ``--log-format simple``:

* ``fairseq-train``: ``num. shared/expert model params: N`` (total parameters), ``train_inner``
  lines (``key=value, ...``: the last one gives the gated routers' ``aux_loss``,
  ``expert_load_max``, ``dropped``, ``gate_entropy``; their ``train_wall`` summed gives the
  training time at each logged update), ``| train | epoch`` lines (``key value |
  ...``, one per epoch: ``wpb``, ``num_updates`` and ``train_wall`` give training words/s) and
  ``valid on 'valid' subset`` lines (the validation curve);
* ``fairseq-generate``: ``H-``/``T-`` lines by sentence id and the ``Translated N sentences (M
  tokens) in Xs (Y sentences/s, Z tokens/s)`` line.
"""
import json
import re
from typing import Dict, List, Optional

ROUTER_STATS = ("aux_loss", "expert_load_max", "dropped", "gate_entropy")
NUMBER = r"-?(?:\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|inf|nan)"


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _pipe_stats(line: str, marker: str) -> Dict[str, float]:
    """``key value | key value`` after ``marker`` (fairseq's end-of-epoch and valid lines)."""
    stats = {}
    for field in line.split(marker, 1)[1].split(" | "):
        m = re.fullmatch(rf"\s*(\w+) ({NUMBER})\s*", field)
        if m:
            stats[m.group(1)] = _number(m.group(2))
    return stats


def _comma_stats(line: str) -> Dict[str, float]:
    """``key=value, key=value`` (fairseq's ``train_inner`` progress lines)."""
    return {k: _number(v) for k, v in re.findall(rf"(\w+)=({NUMBER})(?:,|\s|$)", line)}


def parse_train_log(text: str) -> dict:
    """Total parameters, validation curve, training words/s and the last training statistics."""
    params = [int(n.replace(",", "")) for n in
              re.findall(r"num\. (?:shared|expert) model params: ([\d,]+)", text)]
    epochs, inner, valid = [], None, {}
    for line in text.splitlines():
        if " | train | " in line:
            epochs.append(_pipe_stats(line, " | train | "))
        elif " | train_inner | " in line:
            inner = _comma_stats(line)
        elif "valid on 'valid' subset" in line:
            stats = _pipe_stats(line, "valid on 'valid' subset")
            if "num_updates" in stats:  # one point per update count (the last wins)
                valid[int(stats["num_updates"])] = stats
    last = inner or (epochs[-1] if epochs else {})
    return {
        "total_params": sum(params) if params else None,
        "num_updates": int(epochs[-1]["num_updates"]) if epochs else None,
        "valid_curve": [{"num_updates": n, "loss": s.get("loss"), "nll_loss": s.get("nll_loss")}
                        for n, s in sorted(valid.items())],
        "train_words_per_s": train_words_per_s(epochs),
        "train_wall_s": sum(e.get("train_wall", 0.0) for e in epochs) if epochs else None,
        "train_last": {k: last[k] for k in ("loss", "nll_loss", "consistency", *ROUTER_STATS)
                       if k in last},
    }


def train_seconds_by_update(text: str) -> Dict[int, float]:
    """Cumulative seconds inside training steps at each logged update: the running sum of the
    ``train_wall`` of ``train_inner`` lines (fairseq resets that meter after each line, not at
    epoch ends, and rounds it to whole seconds: +-0.5 s per line)."""
    seconds, total = {}, 0.0
    for line in text.splitlines():
        if " | train_inner | " in line:
            stats = _comma_stats(line)
            if "num_updates" in stats:
                total += stats.get("train_wall", 0.0)
                seconds[int(stats["num_updates"])] = total
    return seconds


def progress(line: str) -> Optional[str]:
    """A short progress note for a ``fairseq-train`` log line, or None."""
    if "valid on 'valid' subset" in line:
        s = _pipe_stats(line, "valid on 'valid' subset")
        bleu = f", BLEU {s['bleu']}" if "bleu" in s else ""
        return (f"update {s.get('num_updates', 0):5.0f}: valid loss {s.get('loss')}, nll_loss {s.get('nll_loss')}"
                f"{bleu}")
    if "done training in" in line:
        return line.split(" | ")[-1].strip()
    return None


def train_words_per_s(epochs: List[Dict[str, float]]) -> Optional[float]:
    """Target words trained on per second of ``train_wall`` (time inside training steps, so
    validation and checkpointing do not count). Each epoch line gives its words per batch and
    its own ``train_wall``; ``num_updates`` is cumulative. ``train_wall`` is logged in whole
    seconds, so runs shorter than 10 s fall back to fairseq's ``wps`` (which counts everything
    since the epoch began), weighted by updates."""
    words, wall, previous, wps = 0.0, 0.0, 0, []
    for e in epochs:
        if not {"wpb", "num_updates"} <= e.keys():
            continue
        updates = e["num_updates"] - previous
        previous = e["num_updates"]
        words += e["wpb"] * updates
        wall += e.get("train_wall", 0.0)
        if "wps" in e:
            wps.append((e["wps"], updates))
    if wall >= 10:
        return round(words / wall, 1)
    total = sum(u for _, u in wps)
    return round(sum(w * u for w, u in wps) / total, 1) if total else None


def parse_generate_log(text: str) -> dict:
    """Hypotheses and references in sentence order, and decoding tokens/s."""
    # imported here: importing the plugin loads fairseq and fairscale (seconds, and warnings on
    # stderr), which quality.py/compare.py must not pay before their one-line argument errors
    from fairseq_thor.generate_output import in_sentence_order

    speed = re.search(rf"Translated ({NUMBER}) sentences \(({NUMBER}) tokens\) in ({NUMBER})s "
                      rf"\(({NUMBER}) sentences/s, ({NUMBER}) tokens/s\)", text)
    return {
        "hypotheses": in_sentence_order(text, "H"),
        "references": in_sentence_order(text, "T"),
        "sentences": int(_number(speed.group(1))) if speed else None,
        "decode_tokens_per_s": _number(speed.group(5)) if speed else None,
    }


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


def sacrebleu_scores(hypotheses: List[str], references: List[str]) -> Dict[str, float]:
    import sacrebleu

    if len(hypotheses) != len(references):  # a partial score would look like a real one
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    # the brevity penalty and length ratio tell a short or run-on output from a wrong one
    return {"bleu": round(bleu.score, 2), "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
            "bleu_bp": round(bleu.bp, 3), "length_ratio": round(bleu.sys_len / max(1, bleu.ref_len), 3)}


# --- the report -------------------------------------------------------------------------------

COLUMNS = [  # (header, key in a row, format)
    ("model", "model", "{}"),
    ("status", "status", "{}"),
    ("BLEU", "bleu", "{:.2f}"),
    ("chrF2", "chrf", "{:.2f}"),
    ("valid loss", "valid_loss", "{:.3f}"),
    ("total params", "total_params", "{:,}"),
    ("active params/token", "active_params", "{:,}"),
    ("train words/s", "train_words_per_s", "{:,.0f}"),
    ("decode tokens/s", "decode_tokens_per_s", "{:,.0f}"),
]


def markdown(result: dict) -> str:
    cfg = result["config"]
    rows = [[fmt.format(row[key]) if row.get(key) is not None else "—" for _, key, fmt in COLUMNS]
            for row in result["models"]]
    header = [h for h, _, _ in COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    out = [
        f"# Dense vs THOR vs gated MoE: {cfg['max_update']} updates each",
        "",
        f"Data `{cfg['data']}`; {cfg['layers']}+{cfg['layers']} layers, d={cfg['embed_dim']}, "
        f"FFN {cfg['ffn_dim']}, E={cfg['num_experts']} experts in every other layer, "
        f"max tokens {cfg['max_tokens']}, seed {cfg['seed']}, THOR alpha {cfg['alpha']}, "
        f"Switch/GShard capacity factor {cfg.get('capacity_factor', 1.0)}, "
        f"device {cfg['device']}, threads {cfg['threads'] or 'default'}. "
        f"Test split decoded with beam 5; detokenized sacreBLEU against {cfg['references']}.",
        "",
        line(header), rule, *map(line, rows), "",
        "Active params/token: everything outside the expert FFNs plus one expert per expert layer "
        "(two for GShard top-2). Train words/s: target words per second inside training steps "
        "(THOR runs two passes per update). Valid loss: label-smoothed CE at the last update.",
    ]
    failed = [row for row in result["models"] if row["status"] != "ok"]
    if failed:
        out += ["", f"**Failed ({len(failed)}):** no result for these models (router unavailable "
                    "or run broken); the rest of the table is unaffected.", ""]
        out += [f"- `{row['model']}`: {error_summary(row['error'])}" for row in failed]
    return "\n".join(out) + "\n"


def error_summary(error: str) -> str:
    """The line of an error's tail that says what went wrong (argparse's ``error:``, an
    exception's last line), else its last line."""
    lines = [line.strip() for line in (error or "unknown error").strip().splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"error|exception|killed", line, re.I)]
    return (named or lines)[-1][:300]


def write_json(result: dict, path: str):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def plot_valid_loss(result: dict, path: str):
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import turns on DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result["models"]:
        curve = [p for p in row.get("valid_curve") or [] if p["loss"] is not None]
        if curve:
            ax.plot([p["num_updates"] for p in curve], [p["loss"] for p in curve],
                    marker="o", markersize=3, label=row["model"])
    failed = [row["model"] for row in result["models"] if row["status"] != "ok"]
    title = "validation loss (label-smoothed CE)"
    ax.set_title(title + (f"; failed: {', '.join(failed)}" if failed else ""))
    ax.set_xlabel("updates")
    ax.set_ylabel("loss (bits)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
