"""A stack of encoder layers (12 BERT-base layers on GPU), inference: fastenc.TransformerEncoder against
nn.TransformerEncoder (eager, fast path with nested tensors, torch.compile) and HF BertModel (sdpa, and
after fastenc.optimize), padding 0-75%.

FLOPs: layers x ``encoder_stack.flops``.
"""
from __future__ import annotations

from .. import registry as R
from . import encoder_stack as S

PROVIDERS = [S.FASTENC_AUTO, S.FASTENC_REFERENCE, S.TORCH_EAGER, S.TORCH_FASTPATH, S.TORCH_COMPILE,
             S.HF_BERT_SDPA, S.HF_BERT_FASTENC]


def _e(mode, sweep, dev, dt, exclude=None, rank=(0,), **kw):
    return R.entry(S.workload_of("encoder"), "encoder", mode, sweep, dev, dt, exclude, rank, **kw)


def _tiny(dev, dt, extra):
    return [_e("fwd", "padding", dev, dt, R.NO_COMPILE_TINY, batch=4, seqlen=32, layers=2, padding=pad,
               d_model=64, nhead=2, d_ff=128) for pad in (0.0, 0.5)]


def _cpu(dev, dt, extra):
    return [_e("fwd", "padding", dev, dt, R.only_at(pad == 0.5, "torch-compile"), (4,), batch=8, seqlen=128,
               layers=2, padding=pad, d_model=128, nhead=2, d_ff=512) for pad in (0.0, 0.25, 0.5, 0.75)]


def _gpu(dev, dt, extra):
    e = [_e("fwd", "padding", dev, dt, R.HEAVY, (6,), batch=32, seqlen=512, layers=12, padding=pad, **R.BERT)
         for pad in (0.0, 0.25, 0.5, 0.75)]
    e.append(_e("fwd", "compile", dev, dt, None, (9, 3), batch=32, seqlen=512, layers=12, padding=0.5, **R.BERT))
    e += [_e("fwd", "seqlen", dev, dt, R.HEAVY, (10,), batch=R.GPU_TOKENS // n, seqlen=n, layers=12, **R.BERT)
          for n in (128, 4096)]
    return e


SUITE = R.register(R.Suite("encoder", PROVIDERS, {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}))
