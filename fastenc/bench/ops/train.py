"""Training step of an encoder stack (forward + backward + AdamW): fastenc.TransformerEncoder against
nn.TransformerEncoder (eager, torch.compile) and HF BertModel (sdpa, and after fastenc.optimize), padding
0 and 50%, and dropout 0.1 (fine-tuning's; random masks, so that point checks finiteness only).

FLOPs: layers x ``encoder_stack.flops`` in "train" mode (forward + backward).
"""
from __future__ import annotations

from .. import registry as R
from . import encoder_stack as S

PROVIDERS = [S.FASTENC_AUTO, S.FASTENC_REFERENCE, S.TORCH_EAGER, S.TORCH_COMPILE, S.HF_BERT_SDPA, S.HF_BERT_FASTENC]


def _e(sweep, dev, dt, exclude=None, rank=(0,), **kw):
    return R.entry(S.workload_of("train"), "train", "train", sweep, dev, dt, exclude, rank, **kw)


def _tiny(dev, dt, extra):
    m = dict(d_model=64, nhead=2, d_ff=128)
    return [_e("seqlen", dev, dt, R.NO_COMPILE_TINY, batch=2, seqlen=32, layers=2, **m),
            _e("dropout", dev, dt, R.NO_COMPILE_TINY, batch=2, seqlen=32, layers=2, padding=0.5, dropout=0.1,
               **m)]


def _cpu(dev, dt, extra):
    m = dict(d_model=256, nhead=4, d_ff=1024)
    # The padding-free training goal (CPU: >= 1.5x torch eager at 50% padding) is read off these rows.
    e = [_e("padding", dev, dt, R.only_at(pad == 0.0, "torch-compile"), (5,), batch=16, seqlen=128, layers=4,
            padding=pad, **m) for pad in (0.0, 0.5)]
    e.append(_e("dropout", dev, dt, R.only_at(False, "torch-compile"), (5,), batch=16, seqlen=128, layers=4,
                padding=0.5, dropout=0.1, **m))
    return e


def _gpu(dev, dt, extra):
    m = dict(batch=32, seqlen=512, layers=12)
    e = [_e("padding", dev, dt, R.HEAVY, (7,), **m, padding=pad, **R.BERT) for pad in (0.0, 0.5)]
    # Fine-tuning runs dropout 0.1 (BERT's): the in-kernel masks of attention and LayerNorm cost integer work.
    e.append(_e("dropout", dev, dt, R.HEAVY, (8,), **m, padding=0.5, dropout=0.1, **R.BERT))
    return e


SUITE = R.register(R.Suite("train", PROVIDERS, {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}))
