"""Pretrain a small fastenc encoder from scratch (masked-language modelling) and fine-tune from it.

    python examples/pretrain.py --out enc.pt              # = python -m fastenc pretrain --out enc.pt
    python -m fastenc finetune --pretrained enc.pt        # a classifier on the reviews, starting from it

Corpus: fastenc's shipped paragraphs plus the training reviews' texts (``fastenc/data/README.md``);
training is padding-free.  Details: ``fastenc.apps.pretrain``.
"""
from fastenc.apps.pretrain import main

if __name__ == "__main__":
    main()
