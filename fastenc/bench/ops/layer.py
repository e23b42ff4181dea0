"""One encoder layer (BERT-base widths on GPU): fastenc.TransformerEncoderLayer against nn.TransformerEncoderLayer
(eager, its inference fast path, torch.compile), inference forward and training step.

FLOPs: ``encoder_stack.flops`` (projections, FFN, attention on real tokens).
"""
from __future__ import annotations

from .. import registry as R
from . import encoder_stack as S

PROVIDERS = [S.FASTENC_AUTO, S.FASTENC_REFERENCE, S.TORCH_EAGER, S.TORCH_FASTPATH, S.TORCH_COMPILE]


def _e(mode, sweep, dev, dt, exclude=None, rank=(0,), **kw):
    return R.entry(S.workload_of("layer"), "layer", mode, sweep, dev, dt, exclude, rank, **kw)


def _tiny(dev, dt, extra):
    return [_e("train", "seqlen", dev, dt, R.NO_COMPILE_TINY, batch=2, seqlen=32, layers=1, d_model=64, nhead=2,
               d_ff=128)]


def _cpu(dev, dt, extra):
    m = dict(d_model=256, nhead=4, d_ff=1024)
    return [_e(mode, "seqlen", dev, dt, R.only_at(n == 64, "torch-compile"), (3,), batch=1024 // n, seqlen=n,
               layers=1, **m)
            for mode in ("fwd", "train") for n in (64, 256)]


def _gpu(dev, dt, extra):
    e = [_e(mode, "seqlen", dev, dt, R.HEAVY, (5,), batch=R.GPU_TOKENS // n, seqlen=n, layers=1, **R.BERT)
         for mode in ("fwd", "train") for n in (128, 512, 1024, 4096)]
    e.append(_e("train", "compile", dev, dt, None, (9, 2), batch=32, seqlen=512, layers=1, **R.BERT))
    e += [_e("train", "dtype", dev, d, R.HEAVY, (12, j), batch=32, seqlen=512, layers=1, **R.BERT)
          for j, d in enumerate(extra)]
    return e


SUITE = R.register(R.Suite("layer", PROVIDERS, {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}))
