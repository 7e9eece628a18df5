"""Train a joint sentencepiece model on the training split and encode every split.

    python prepare_spm.py --raw RAW_DIR --out SPM_DIR --src de --tgt en --vocab-size 8000
"""
import argparse
import os

import sentencepiece as spm


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", required=True, help="directory with {train,valid,test}.{src,tgt}")
    p.add_argument("--out", required=True, help="directory for the model and encoded text")
    p.add_argument("--src", required=True)
    p.add_argument("--tgt", required=True)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--splits", default="train,valid,test")
    args = p.parse_args()

    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "spm")
    train_files = [os.path.join(args.raw, f"train.{lang}") for lang in (args.src, args.tgt)]
    spm.SentencePieceTrainer.train(
        input=",".join(train_files), model_prefix=prefix, vocab_size=args.vocab_size,
        character_coverage=1.0, model_type="unigram", num_threads=2,
        # fairseq's dictionary adds <s> <pad> </s> <unk> itself; keep sentencepiece's out of the way
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    for split in args.splits.split(","):
        for lang in (args.src, args.tgt):
            src_path = os.path.join(args.raw, f"{split}.{lang}")
            with open(src_path, encoding="utf-8") as fin, \
                    open(os.path.join(args.out, f"{split}.{lang}"), "w", encoding="utf-8") as fout:
                for line in fin:
                    fout.write(" ".join(sp.encode(line.rstrip("\n"), out_type=str)) + "\n")
    print(f"sentencepiece model: {prefix}.model (vocab {args.vocab_size})")


if __name__ == "__main__":
    main()
