"""Fine-tune a text classifier with fastenc and report accuracy and training tokens/s per backend.

    python examples/finetune_classifier.py                       # fastenc SequenceClassifier, shipped reviews
    python examples/finetune_classifier.py --model hf-bert       # transformers' BertForSequenceClassification,
                                                                 # optimized by fastenc.optimize
    python examples/finetune_classifier.py --backends reference,triton --device cuda
    python examples/finetune_classifier.py --data my.tsv         # your own 'label<TAB>text' file

Data: by default ``fastenc/data/reviews.tsv``, 944 short English reviews (movies, books,
restaurants, products, hotels, apps...) labeled negative/positive, written by hand for
fastenc and shipped with it under the same licence (provenance in ``fastenc/data/README.md``);
every 5th review is held out for the accuracy.  The set is small: accuracy on it shows that
training works, it does not rank models.  The model and its word-level tokenizer are built
from scratch, so the run is offline.  On a CPU the defaults take a few minutes; the "auto"
backend is the PyTorch reference there.
"""
from fastenc.apps.finetune import main

if __name__ == "__main__":
    main()
