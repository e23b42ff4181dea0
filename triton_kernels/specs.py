"""Ahead-of-time compile specs of the shipped Triton kernels, for the kernel inspector
(``fastenc.apps.inspector``, ``python -m fastenc inspect``) and the sm_90 code-generation tests.

``COMPILE_SPECS`` maps each op to a function returning a list of dicts
``{"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "hot"}`` (optionally
``"attrs"``, the ``tt.divisibility`` hints passed on to ``ASTSource``), one per shipped launch
config, each the kernel Triton's JIT builds for such a launch; ``triton.compile`` takes them
without a GPU.  ``fn`` is the @triton.jit function: under TRITON_INTERPRET=1 it is an interpreter
wrapper that ``triton.compile`` cannot take, so compile in a process without that variable.
"""
from __future__ import annotations

import itertools
from typing import Tuple

import torch

from . import attention, layer_norm, padding
from .attention_config import KERNELS, AttentionConfig
from .layer_norm_config import MAX_HIDDEN, LayerNormBwdConfig, LayerNormFwdConfig
from .padding_config import GatherConfig

# --------------------------------------------------------------------------- attention

_ATTN_SCALARS = {"sm_scale": "fp32", "drop_thresh": "i32", "drop_scale": "fp32"}
_ATTN_POINTERS = {"Lse": "*fp32", "Delta": "*fp32", "Mask": "*u8", "Kpm": "*u8", "KvRange": "*i32", "CuSeqQ": "*i32",
                  "CuSeqK": "*i32", "Seed": "*i64"}
_ATTN_TENSORS = ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")


def attention_specs(dtype: str = "fp16", arch: Tuple[int, int] = (9, 0)) -> list:
    """One entry per shipped config of each attention kernel.

    Each spec is the kernel Triton's JIT builds for a BERT-style launch (B=2, L=S=512, H=12,
    contiguous masks): integer arguments equal to 1 (the unit last stride of a key padding mask or
    an attn_mask) become constexprs, and pointers, strides and L/S that are multiples of 16 carry
    ``tt.divisibility`` in ``attrs`` (without it the loads are not vectorised and the registers
    differ from what runs).
    Hot variant (``hot=True``): boolean key padding mask, no causal, no dropout, at the largest head
    dim of each config bucket (64, 128, 256).  ``hot=False``: the forward's attn_mask configs (a
    narrower key tile) with a boolean mask, float (fp32) masks where shared memory peaks, and
    every kernel with dropout (training) at each head-dim bucket.
    """
    fns = {"fwd": attention._attn_fwd_kernel, "bwd_dq": attention._attn_bwd_dq_kernel,
           "bwd_dkdv": attention._attn_bwd_dkdv_kernel}
    variants = [(kernel, head_dim, seqlen, None, False) for kernel in KERNELS for head_dim in (64, 128, 256)
                for seqlen in ((64, 512) if kernel == "fwd" else (512,))]
    variants += [("fwd", head_dim, seqlen, "u8", False) for head_dim in (128, 256) for seqlen in (64, 512)]
    variants += [("fwd", 64, 512, "fp32", False), ("bwd_dq", 128, 512, "fp32", False)]
    variants += [(kernel, head_dim, 512, None, True) for kernel in KERNELS for head_dim in (64, 128, 256)]
    unit_strides = {"stride_pn", "stride_mn"}
    specs, seen = [], set()
    for kernel, head_dim, seqlen, mask, dropout in variants:
        cfg = AttentionConfig.for_launch(kernel, head_dim, seqlen, torch.float16, arch, masked=mask is not None,
                                         dropout=dropout)
        key = (kernel, head_dim, mask, dropout, cfg)
        if key in seen:
            continue
        seen.add(key)
        fn = fns[kernel]
        constexprs = dict(
            HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, IS_CAUSAL=False,
            IS_VARLEN=False, HAS_MASK=mask is not None, MASK_BOOL=mask == "u8", HAS_KPM=mask is None,
            KPM_BOOL=mask is None, DROPOUT=dropout, DOT_PRECISION="tf32",
        )
        constexprs.update({"stride_pn" if mask is None else "stride_mn": 1})
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in _ATTN_TENSORS:
                signature[name] = f"*{dtype}"
            elif name == "Mask" and mask is not None:
                signature[name] = f"*{mask}"
            else:
                signature[name] = _ATTN_POINTERS.get(name) or _ATTN_SCALARS.get(name, "i32")
        # pointers, every stride but the unit ones (multiples of 16 or 0 at L = S = 512), L and S
        aligned = [name for name in fn.arg_names if signature[name].startswith("*") or name in ("L", "S")
                   or (name.startswith("stride_") and name not in unit_strides)]
        tag = ("" if mask is None else ("_mask" if mask == "u8" else f"_mask{mask}")) + ("_dropout" if dropout else "")
        specs.append(dict(
            name=f"attention_{kernel}{tag}_hd{head_dim}_m{cfg.BLOCK_M}_n{cfg.BLOCK_N}",
            fn=fn, signature=signature, constexprs=constexprs,
            attrs={(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, hot=mask is None and not dropout,
        ))
    return specs


# --------------------------------------------------------------------------- residual + LayerNorm

_LN_STRIDES = {"stride_x_outer": "i64", "stride_x_inner": "i32", "stride_br_outer": "i64", "stride_br_inner": "i32",
               "stride_dy_outer": "i64", "stride_dy_inner": "i32", "stride_dres_outer": "i64",
               "stride_dres_inner": "i32"}


def _ln_signature(fn, constexprs: dict, dtype: str = "fp16") -> dict:
    """Argument types: activations in ``dtype``, fp32 parameters, statistics and partial sums."""
    types = {"SEED": "*i64", "MEAN": "*fp32", "RSTD": "*fp32", "W": "*fp32", "B": "*fp32", "M": "i32", "N": "i32",
             "INNER": "i32", "eps": "fp32", "dropout_p": "fp32", "drop_thresh": "i32", "dropout_scale": "fp32",
             "tiles_per_program": "i32", **_LN_STRIDES}
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in types:
            sig[arg] = types[arg]
        else:
            sig[arg] = "*fp32" if arg.endswith("_PART") else f"*{dtype}"
    return sig


def _ln_aligned_attrs(fn, signature: dict) -> dict:
    """The hints the JIT adds for 16-byte aligned pointers and sizes and strides divisible by 16
    (contiguous rows with N % 16 == 0): vectorised loads, a different register allocation."""
    names = list(fn.arg_names)
    return {(names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items()
            if t.startswith("*") or a == "N" or a.startswith("stride")}


def layer_norm_specs(dtypes=("fp16",), aligned=(False,), blocks=None) -> list:
    """One entry per shipped config of each hot LayerNorm kernel (per hidden-size bucket).

    The flags are the heaviest variant each config runs (branch, branch bias, dropout,
    weight, bias, prenorm or post-norm recompute), which bounds register use.  By default
    fp16 activations and sizes without divisibility hints (as for N = 1000), over every
    bucket (what `python -m fastenc inspect` compiles); ``dtypes`` ("fp16", "bf16",
    "fp32"), ``aligned`` (False: no hints, True: the JIT's 16-divisibility hints) and
    ``blocks`` (BLOCK_N buckets) widen or narrow the sweep.
    """
    specs = []
    variant = dict(dtype="fp16", aligned=False)

    def add(name, fn, constexprs, launch):
        sig = _ln_signature(fn, constexprs, variant["dtype"])
        tag = "" if (variant["dtype"], variant["aligned"]) == ("fp16", False) else (
            f",{variant['dtype']}" + (",aligned" if variant["aligned"] else ""))
        spec = dict(name=f"{name[:-1]}{tag}]", fn=fn, signature=sig, constexprs=constexprs,
                    num_warps=launch.num_warps, num_stages=launch.num_stages, hot=True)
        if variant["aligned"]:
            spec["attrs"] = _ln_aligned_attrs(fn, sig)
        specs.append(spec)

    all_blocks = [2**k for k in range(4, MAX_HIDDEN.bit_length())]
    for block, dtype, align in itertools.product(blocks or all_blocks, dtypes, aligned):
        variant.update(dtype=dtype, aligned=align)
        # A hinted N is a multiple of 16, which is when the launchers group dropout draws.
        feats = dict(HAS_BRANCH=True, HAS_BRANCH_BIAS=True, HAS_DROPOUT=True, GROUP_RNG=align)
        f = LayerNormFwdConfig.for_hidden(block)
        add(f"_ln_fwd_kernel[BLOCK_N={block}]", layer_norm._ln_fwd_kernel,
            dict(feats, HAS_W=True, HAS_B=True, STORE_RESID=True, BLOCK_N=block, ROWS=f.ROWS), f)
        # Each backward config once, with the heaviest flags it runs with (dropout where it takes it).
        size = 4 if dtype == "fp32" else 2
        bwd = {dropout: LayerNormBwdConfig.for_hidden(block, dropout, size) for dropout in (False, True)}
        configs = {bwd[dropout].wide: (dropout, bwd[dropout]) for dropout in (False, True)}
        for dropout, b in configs.values():
            for recompute in (True, False):
                mode = "postnorm" if recompute else "prenorm"
                flags = dict(feats, HAS_DROPOUT=dropout, HAS_W=True, RECOMPUTE=recompute,
                             HAS_DRESID=not recompute, STORE_DBRANCH=True)
                if not b.wide:
                    add(f"_ln_bwd_kernel[BLOCK_N={block},{mode}]", layer_norm._ln_bwd_kernel,
                        dict(flags, COMPUTE_DW=True, COMPUTE_DB=True, COMPUTE_DBB=not b.dbb_pass, BLOCK_N=block,
                             ROWS=b.ROWS), b)
                else:
                    add(f"_ln_bwd_wide_kernel[BLOCK_N={block},{mode}]", layer_norm._ln_bwd_wide_kernel,
                        dict(flags, BLOCK_C=b.BLOCK_C), b)
                if b.wide or b.dbb_pass:
                    p = b.params
                    sums = dict(COMPUTE_DW=b.wide, COMPUTE_DB=b.wide, COMPUTE_DBB=True)
                    add(f"_ln_bwd_params_kernel[BLOCK_N={block},{mode}{'' if b.wide else ',dbb'}]",
                        layer_norm._ln_bwd_params_kernel,
                        dict(feats, HAS_DROPOUT=dropout, RECOMPUTE=recompute, **sums, BLOCK_C=p.BLOCK_C,
                             ROWS=p.ROWS), p)
    return specs


# --------------------------------------------------------------------------- padding


def padding_specs() -> list:
    """The row gather at a BERT-base row (768 fp16) and a wide one."""
    specs = []
    for n in (768, 4096):
        cfg = GatherConfig.for_rows(n, 2)
        specs.append({
            "name": f"gather_rows[n={n},fp16]",
            "fn": padding._gather_rows_kernel,
            "signature": {"src": "*fp16", "idx": "*i64", "out": "*fp16", "n_cols": "i32", "src_stride": "i64",
                          "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": cfg.BLOCK},
            "num_warps": cfg.num_warps,
            "num_stages": 1,
            "hot": False,
        })
    return specs


COMPILE_SPECS = {"attention": attention_specs, "layer_norm": layer_norm_specs, "padding": padding_specs}
