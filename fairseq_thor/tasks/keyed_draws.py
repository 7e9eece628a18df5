"""Task mixin: decoding and validation that do not depend on how sentences are batched.

With ``sentence`` inference routing each sentence's experts are random. Drawn from torch's
generator, they depend on the sentences decoded before it and on its place in the batch, so the
same ``--seed`` gave other translations with another ``--batch-size`` or ``--max-tokens``. The THOR
tasks hand the batch's sentence ids to the model around every validation and decoding step, and the
expert layers draw from ``(seed, layer, sentence id)`` instead (``routing.keyed_sentence_experts``).
Models other than ``thor_transformer`` are left alone.
"""
from contextlib import contextmanager


@contextmanager
def sentence_keys(models, sample):
    """Key the draws of ``models`` by ``sample["id"]`` inside the block (nested blocks restore the
    outer keys: fairseq's BLEU validation decodes inside a validation step)."""
    keyed = [m for m in models if hasattr(m, "set_sentence_keys")]
    ids = sample.get("id") if isinstance(sample, dict) else None
    previous = [m.sentence_key_ids for m in keyed]
    for model in keyed:
        model.set_sentence_keys(ids)
    try:
        yield
    finally:
        for model, ids_before in zip(keyed, previous):
            model.set_sentence_keys(ids_before)


class SentenceKeyedDraws:
    def valid_step(self, sample, model, criterion):
        with sentence_keys([model], sample):
            return super().valid_step(sample, model, criterion)

    def inference_step(self, generator, models, sample, *args, **kwargs):
        with sentence_keys(models, sample):
            return super().inference_step(generator, models, sample, *args, **kwargs)
