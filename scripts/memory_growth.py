"""Memory over a long run of mixed-shape calls: an optimized model beside the unoptimized one (issue #22).

    python scripts/memory_growth.py [--calls 10000] [--quantize int8] [--out memory.json]

One HF BertModel (MiniLM size, random weights) and its fastenc copy are called in turn, in one process, on
random batches (batch 1-16, lengths 1-128, ragged padding), under torch.inference_mode().  Process memory
grows under such a loop even for plain PyTorch (glibc's allocator keeps freed arenas), so the growth of
each model is measured as the RSS increase over its own calls only (each call's delta, summed): what fastenc
adds is the difference.  Also printed: fastenc's own state (weight-cache entries, decision-cache entries)
at the start and the end, and the max error of fastenc against the unoptimized model, checked every
``--check-every`` calls.  Memory is measured, not time: a busy machine gives the same figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def main() -> None:
    import transformers

    import fastenc
    from fastenc import backends
    from fastenc.weight_cache import cache_of

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--quantize", default=None, choices=(None, "int8"))
    ap.add_argument("--check-every", type=int, default=250)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536)
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    fast = fastenc.optimize(copy.deepcopy(hf), quantize=args.quantize)
    g = torch.Generator().manual_seed(0)
    growth = {"hf": 0.0, "fastenc": 0.0}
    worst, first = 0.0, None
    with torch.inference_mode():
        for i in range(args.calls):
            b, length = int(torch.randint(1, 17, (1,), generator=g)), int(torch.randint(1, 129, (1,), generator=g))
            ids = torch.randint(1, 30522, (b, length), generator=g)
            mask = (torch.arange(length)[None] < torch.randint(1, length + 1, (b, 1), generator=g)).long()
            outs = {}
            for name, model in (("hf", hf), ("fastenc", fast)):
                before = rss_mb()
                outs[name] = model(input_ids=ids, attention_mask=mask).last_hidden_state
                growth[name] += rss_mb() - before
            if first is None:
                first = dict(rss_mb=rss_mb(), cache=len(cache_of(fast.encoder)), decisions=len(backends._DECISIONS))
            if i % args.check_every == 0 or i == args.calls - 1:
                keep = mask.bool()
                err = (outs["fastenc"][keep] - outs["hf"][keep]).abs().max().item()
                worst = max(worst, err)
                print(f"call {i:6d}: rss {rss_mb():7.0f} MB, growth hf {growth['hf']:+7.1f} MB, "
                      f"fastenc {growth['fastenc']:+7.1f} MB, max error {err:.2e}", flush=True)
    result = dict(calls=args.calls, quantize=args.quantize, growth_mb=growth, worst_error=worst, start=first,
                  end=dict(rss_mb=rss_mb(), cache=len(cache_of(fast.encoder)), decisions=len(backends._DECISIONS)))
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
