"""Reading fairseq's logs, for ``quality.py`` and its cells.

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
import re
from typing import Dict, List, Optional

ROUTER_STATS = ("aux_loss", "expert_load_max", "dropped", "gate_entropy")
NUMBER = r"-?(?:\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|inf|nan)"


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def pipe_stats(line: str, marker: str) -> Dict[str, float]:
    """``key value | key value`` after ``marker`` (fairseq's end-of-epoch and valid lines)."""
    stats = {}
    for field in line.split(marker, 1)[1].split(" | "):
        m = re.fullmatch(rf"\s*(\w+) ({NUMBER})\s*", field)
        if m:
            stats[m.group(1)] = _number(m.group(2))
    return stats


def comma_stats(line: str) -> Dict[str, float]:
    """``key=value, key=value`` (fairseq's ``train_inner`` progress lines)."""
    return {k: _number(v) for k, v in re.findall(rf"(\w+)=({NUMBER})(?:,|\s|$)", line)}


def parse_train_log(text: str) -> dict:
    """Total parameters, validation curve, training words/s and the last training statistics."""
    params = [int(n.replace(",", "")) for n in
              re.findall(r"num\. (?:shared|expert) model params: ([\d,]+)", text)]
    epochs, inner, valid = [], None, {}
    for line in text.splitlines():
        if " | train | " in line:
            epochs.append(pipe_stats(line, " | train | "))
        elif " | train_inner | " in line:
            inner = comma_stats(line)
        elif "valid on 'valid' subset" in line:
            stats = pipe_stats(line, "valid on 'valid' subset")
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
            stats = comma_stats(line)
            if "num_updates" in stats:
                total += stats.get("train_wall", 0.0)
                seconds[int(stats["num_updates"])] = total
    return seconds


def progress(line: str) -> Optional[str]:
    """A short progress note for a ``fairseq-train`` log line, or None."""
    if "valid on 'valid' subset" in line:
        s = pipe_stats(line, "valid on 'valid' subset")
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
        "decode_s": _number(speed.group(3)) if speed else None,  # fairseq's timer: generation only
        "decode_tokens_per_s": _number(speed.group(5)) if speed else None,
    }

def error_summary(error: str) -> str:
    """The line of an error's tail that says what went wrong (argparse's ``error:``, an
    exception's last line), else its last line."""
    lines = [line.strip() for line in (error or "unknown error").strip().splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"error|exception|killed", line, re.I)]
    return (named or lines)[-1][:300]
