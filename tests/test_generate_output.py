"""fairseq_thor.generate_output: fairseq-generate's blocks back in sentence order."""
from fairseq_thor.generate_output import in_sentence_order, lines_by_id

# what fairseq-generate prints: batch order (by length), an empty hypothesis, a log line in between
OUTPUT = "\n".join([
    "S-2\tein langer Satz", "T-2\ta long sentence", "H-2\t-0.31\ta long sentence", "D-2\t-0.31\ta long sentence",
    "2026-12-03 | INFO | fairseq_cli.generate | NOTE: hypothesis and token scores are output in base 2",
    "S-0\tja", "T-0\tyes", "H-0\t-0.12\t", "P-0\t-0.1 -0.2",
    "S-1\tnein", "T-1\tno", "H-1\t-0.2\tno",
    "Generate test with beam=5: BLEU4 = 40.0",
])


def test_blocks_come_back_in_sentence_order_with_empty_texts_kept():
    assert in_sentence_order(OUTPUT, "H") == ["", "no", "a long sentence"]
    assert in_sentence_order(OUTPUT, "T") == ["yes", "no", "a long sentence"]
    assert in_sentence_order(OUTPUT, "S") == ["ja", "nein", "ein langer Satz"]
    assert lines_by_id(OUTPUT, "H") == {2: "a long sentence", 0: "", 1: "no"}
