"""Paired significance of BLEU differences between converged cells, on the test sentences.

The study's spread over seeds says how much training noise moves a row; it says nothing about how
much the choice of the 626 test sentences does, and with one or two seeds it often cannot decide.
This is the other half, as MT papers report it: sacreBLEU's paired bootstrap resampling (Koehn,
2004; 1,000 resamples with sacreBLEU's fixed seed, so a report rebuilt from the same files gives the
same p-values) on the translations each scored view committed (``OUT/translations/``, written by
``convergence_cells.scored``). The p-value is sacreBLEU's: two-sided, the share of resamples whose
absolute BLEU difference, centred on the resamples' mean, exceeds the observed one (+1 smoothing;
two identical systems get 1/1001, by design). One row per pair of cells: a difference counts
when it holds across seeds *and* a pair's p-value is small, not on either alone.

Two cells are compared only when both views were scored against the same references (their SHA-1s
match ``translations/references.txt``); cells scored before translations were committed (the
dense pilot) have none and are listed as such.
"""
import hashlib
import os
from typing import Dict, List, Optional, Tuple

import atomic_files

RESAMPLES = 1000
TRANSLATIONS = "translations"  # under the study's OUT: each scored view's test translations
REFERENCES = "references.txt"  # in TRANSLATIONS: what every view was scored against


def lines_sha1(lines: List[str]) -> str:
    """What a view records of the references it was scored against."""
    return hashlib.sha1("".join(line + "\n" for line in lines).encode("utf-8")).hexdigest()


def write_lines(path: str, lines: List[str]):
    """One sentence per line, written atomically (``read_lines`` and ``lines_sha1`` read this form)."""
    atomic_files.write_text(path, "".join(line + "\n" for line in lines))


def read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]  # one line per sentence; a hypothesis may be empty


def bootstrap(system: List[str], baseline: List[str], references: List[str]) -> Dict[str, float]:
    """BLEU of both, and the paired bootstrap p-value of ``system`` against ``baseline``."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    _, results = PairedTest([("baseline", baseline), ("system", system)], {"BLEU": BLEU()}, [references],
                            test_type="bs", n_samples=RESAMPLES)()
    base, sys_ = results["BLEU"]
    return {"bleu": [round(sys_.score, 2), round(base.score, 2)], "delta": round(sys_.score - base.score, 2),
            "p": round(sys_.p_value, 4), "ci": [round(sys_.ci, 2), round(base.ci, 2)]}


def tests(out_dir: str, cells: List[dict], pairs: List[Tuple[str, str]], views: Dict[str, List[str]]) -> dict:
    """Paired bootstrap of ``a`` against ``b`` for every pair, every view in ``views[b]`` (by
    baseline: e.g. equal time only against dense) and every combination of their seeds.
    ``cells``: the finished cells of one recipe. Returns the rows and the cells without translations."""
    path = os.path.join(out_dir, TRANSLATIONS, REFERENCES)
    references = read_lines(path) if os.path.exists(path) else None
    sha1 = lines_sha1(references) if references is not None else None
    by_model: Dict[str, List[dict]] = {}
    for c in sorted(cells, key=lambda c: c["seed"]):
        by_model.setdefault(c["model"], []).append(c)

    def translations(cell: dict, view: str) -> Optional[List[str]]:
        scored = cell.get(view) or {}
        path = os.path.join(out_dir, scored.get("translations", "-"))
        if "translations" not in scored or scored.get("references_sha1") != sha1 or not os.path.exists(path):
            return None  # listed below the table: a copied cell file may come without its translations
        return read_lines(path)

    rows, without = [], sorted({f"{c['model']} seed {c['seed']}" for c in cells if translations(c, "best") is None})
    for a, b in pairs:
        for view in views.get(b, []):
            for ca in by_model.get(a, []):
                for cb in by_model.get(b, []):
                    system, baseline = translations(ca, view), translations(cb, view)
                    if system is None or baseline is None:
                        continue
                    rows.append({"difference": f"{a} - {b}", "view": view, "seeds": [ca["seed"], cb["seed"]],
                                 **bootstrap(system, baseline, references)})
    return {"resamples": RESAMPLES, "rows": rows, "without_translations": without}
