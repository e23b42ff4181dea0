"""Swap a Hugging Face BERT's encoder for fastenc layers and check it still computes the same thing.

    python examples/optimize_hf_bert.py            # small random BERT (offline), CPU or GPU
    python examples/optimize_hf_bert.py --size base

A real checkpoint works the same way: ``model = AutoModel.from_pretrained(name)`` then
``fastenc.optimize(model)``.  This example builds the model from a config so it never
downloads anything.
"""
import argparse
import copy
import time

import torch
from transformers import BertConfig, BertModel

import fastenc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=("tiny", "base"), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if device == "cuda" else torch.float32)
    layers, hidden = (2, 384) if a.size == "tiny" else (12, 768)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=12,
                        intermediate_size=4 * hidden)
    torch.manual_seed(0)
    original = BertModel(config).to(device, dtype).eval()
    optimized = fastenc.optimize(copy.deepcopy(original))  # same weights, fastenc encoder layers
    ids = torch.randint(1000, config.vocab_size, (a.batch, a.seqlen), device=device)
    lengths = torch.randint(a.seqlen // 4, a.seqlen + 1, (a.batch, 1), device=device)
    mask = (torch.arange(a.seqlen, device=device) < lengths).long()  # the tokenizer's attention_mask
    with torch.no_grad():
        for name, model in (("transformers", original), ("fastenc", optimized)):
            model(input_ids=ids, attention_mask=mask)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask)
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"{name:<12} forward {1e3 * (time.perf_counter() - t0):8.2f} ms")
            if name == "transformers":
                expected = out
    keep = mask.bool()
    diff = (out.last_hidden_state - expected.last_hidden_state)[keep].abs().max().item()
    print(f"max |difference| on real tokens: {diff:.2e} ({dtype}); pooler: "
          f"{(out.pooler_output - expected.pooler_output).abs().max().item():.2e}")
    print(fastenc.backend_report(device=device, dtype=dtype))


if __name__ == "__main__":
    main()
