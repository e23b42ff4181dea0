"""Host time of an optimized model's call: the call's time minus the fused C++ stack's, at batch 1 (issue #23).

    python scripts/host_time.py [--dtype fp32|bf16|int8] [--size minilm|bert-base] [--calls 500] [--rounds 3]

An HF BertModel of MiniLM size or BERT-base width with 4 layers (the bench's "BERT-base (4 of 12 layers)";
random weights), optimized (``int8``: quantized, on the model in bf16), called
on one sequence of 32 tokens under torch.inference_mode(); ``fastenc._C.encoder_forward_cpu`` is wrapped to
time the C++ stack inside each call.  Prints per round the call's mean time, the C++ stack's and the rest (the
Python around it, HF's embeddings included).  A timing: run it alone on the machine.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch


def main() -> None:
    import transformers

    import fastenc
    from fastenc.backends import extension

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="int8", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--size", default="minilm", choices=("minilm", "bert-base"))
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    d, layers = (384, 6) if args.size == "minilm" else (768, 4)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=d, num_hidden_layers=layers, num_attention_heads=12,
                                  intermediate_size=4 * d)
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    model = fastenc.optimize(copy.deepcopy(hf).to(dtype), quantize="int8" if args.dtype == "int8" else None)
    ids, mask = torch.randint(1, 30522, (1, 32)), torch.ones(1, 32, dtype=torch.long)
    ext, stack_s = extension(), [0.0]
    forward = ext.encoder_forward_cpu

    def timed(*a, **k):
        t = time.perf_counter()
        out = forward(*a, **k)
        stack_s[0] += time.perf_counter() - t
        return out
    ext.encoder_forward_cpu = timed
    try:
        with torch.inference_mode():
            for _ in range(50):
                model(input_ids=ids, attention_mask=mask)
            for _ in range(args.rounds):
                stack_s[0] = 0.0
                t = time.perf_counter()
                for _ in range(args.calls):
                    model(input_ids=ids, attention_mask=mask)
                call = (time.perf_counter() - t) / args.calls * 1e3
                cpp = stack_s[0] / args.calls * 1e3
                print(f"{args.dtype}: call {call:.3f} ms, C++ stack {cpp:.3f} ms, rest {call - cpp:.3f} ms", flush=True)
    finally:
        ext.encoder_forward_cpu = forward


if __name__ == "__main__":
    main()
