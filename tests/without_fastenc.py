"""Load saved model folders in a fresh Python process where fastenc cannot be imported, and return what
they compute: proof that a folder fastenc wrote loads with transformers / sentence-transformers alone.

``outputs(jobs)`` runs every job in one process (imports are the slow part) and returns, per job, the
outputs in float32 and float64 (the oracle of the parity rule) and the tokenizer's ``input_ids`` and
``attention_mask``.  A job: ``(kind, folder, texts)``, where texts may also be token ids already
(``{"input_ids": [[...]], "attention_mask": [[...]]}``, not for sentence-transformers); kinds:

* ``"masked-lm"``: ``BertForMaskedLM`` + ``BertTokenizerFast``: ``logits`` [B, L, V];
* ``"sequence-classification"``: ``AutoModelForSequenceClassification`` + ``AutoTokenizer``: ``logits`` [B, K];
* ``"base"``: ``AutoModel`` + ``AutoTokenizer``: ``last_hidden_state`` [B, L, d];
* ``"sentence-transformers"``: ``SentenceTransformer(folder).encode(texts)``: ``embeddings`` [B, D]
  (with the ids of its own tokenizer).
"""
import json
import os
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple, Union

import torch

_SCRIPT = r"""
import json, sys, warnings
sys.modules["fastenc"] = None  # `import fastenc` raises ImportError in this process
import torch
jobs, out = json.load(open(sys.argv[1])), sys.argv[2]
results = []
warnings.simplefilter("ignore")
for kind, folder, texts in jobs:
    r = {}
    if kind == "sentence-transformers":
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(folder, device="cpu")
        enc = model.tokenizer(texts, padding=True, truncation=True, max_length=model.max_seq_length,
                              return_tensors="pt")
        for dtype in (torch.float32, torch.float64):
            r[str(dtype)] = model.to(dtype).encode(texts, convert_to_tensor=True, batch_size=len(texts))
    else:
        import transformers as tf
        cls = {"masked-lm": tf.BertForMaskedLM, "sequence-classification": tf.AutoModelForSequenceClassification,
               "base": tf.AutoModel}[kind]
        tok = (tf.BertTokenizerFast if kind == "masked-lm" else tf.AutoTokenizer).from_pretrained(folder)
        model = cls.from_pretrained(folder).eval()
        if isinstance(texts, dict):
            enc = {k: torch.tensor(v) for k, v in texts.items()}
        else:
            enc = tok(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            for dtype in (torch.float32, torch.float64):
                o = model.to(dtype)(**enc)
                r[str(dtype)] = o.last_hidden_state if kind == "base" else o.logits
    r["input_ids"], r["attention_mask"] = enc["input_ids"], enc["attention_mask"]
    results.append(r)
assert not [m for m, v in sys.modules.items() if m.startswith("fastenc") and v is not None]
torch.save(results, out)
"""


def outputs(jobs: Sequence[Tuple[str, str, Union[List[str], Dict[str, list]]]],
            tmp_path) -> List[Dict[str, torch.Tensor]]:
    """Run ``jobs`` in a fresh process without fastenc; per job: ``fp32``, ``fp64`` outputs, ``input_ids``,
    ``attention_mask``."""
    spec, out = os.path.join(tmp_path, "jobs.json"), os.path.join(tmp_path, "outputs.pt")
    with open(spec, "w") as f:
        json.dump([[k, str(d), t if isinstance(t, dict) else list(t)] for k, d, t in jobs], f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, spec, out], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [{"fp32": r["torch.float32"], "fp64": r["torch.float64"], "input_ids": r["input_ids"],
             "attention_mask": r["attention_mask"]} for r in torch.load(out)]
