"""A fine-tuned classifier's held-out accuracy in fp32 and in fastenc's int8 (issue #23's quality goal).

    python -m fastenc finetune --pretrained minilm --out /tmp/minilm-reviews   # fine-tune all-MiniLM-L6-v2
    python scripts/int8_accuracy.py /tmp/minilm-reviews

Loads the saved Hugging Face folder with transformers, evaluates on fastenc's held-out reviews (every 5th
example of fastenc/data/reviews.tsv, the split finetune trains without): the unmodified model (fp32),
fastenc fp32, fastenc int8 (calibrated on random tokens) and, for reference, the float model's logits'
agreement.  Accuracy is a count of examples, not a timing: a busy machine gives the same figures.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch


def main() -> None:
    import transformers

    import fastenc
    from fastenc.apps.text import reviews_dataset, train_test_split

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="a folder saved by `python -m fastenc finetune --out`")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    tok = transformers.AutoTokenizer.from_pretrained(args.folder)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(args.folder).eval()
    models = {"fp32 (transformers)": hf, "fastenc fp32": fastenc.optimize(copy.deepcopy(hf)),
              "fastenc int8": fastenc.optimize(copy.deepcopy(hf), quantize="int8")}
    _, heldout = train_test_split(reviews_dataset())
    logits = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(0, len(heldout), args.batch_size):
            texts = [t for t, _ in heldout[i:i + args.batch_size]]
            enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            for name, model in models.items():
                logits[name].append(model(**enc).logits)
    labels = torch.tensor([y for _, y in heldout])
    result = {}
    for name, chunks in logits.items():
        pred = torch.cat(chunks).argmax(-1)
        result[name] = dict(accuracy=round((pred == labels).float().mean().item(), 4),
                            agree_with_fp32=round((pred == torch.cat(logits["fp32 (transformers)"]).argmax(-1))
                                                  .float().mean().item(), 4))
    print(json.dumps(dict(examples=len(heldout), **result), indent=1))


if __name__ == "__main__":
    main()
