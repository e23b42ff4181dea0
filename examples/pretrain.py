"""Pretrain a small fastenc encoder from scratch (masked-language modelling) and fine-tune from it.

    python examples/pretrain.py --out enc                 # = python -m fastenc pretrain --out enc
    python -m fastenc finetune --pretrained enc           # a classifier on the reviews, starting from it

Corpus: fastenc's shipped paragraphs plus the training reviews' texts (``fastenc/data/README.md``);
training is padding-free.  ``enc/`` is a Hugging Face folder: ``BertForMaskedLM.from_pretrained("enc")``
and ``AutoTokenizer.from_pretrained("enc")`` load it without fastenc.  Details: ``fastenc.apps.pretrain``.
"""
from fastenc.apps.pretrain import main

if __name__ == "__main__":
    main()
