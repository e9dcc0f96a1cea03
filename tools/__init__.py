"""Data and inference tools over a trained BLIP retrieval model (``python -m tools <command>``).

- ``score``: ITC cosine / ITM match probability of every (image, caption) pair of an annotation file,
  sharded across torchrun ranks, resumable, with a score distribution report (data cleaning).
- ``filter``: keep the pairs above a score threshold or the top fraction; dropped count per source.
- ``embed``: image and text embeddings (+ ids) of a dataset to ``.npy`` / ``.safetensors`` shards.
- ``search``: top-k of queries against an embedded gallery, optional ITM rerank, ranked JSON and a
  contact sheet.
- ``ensemble``: score fusion and feature fusion of several checkpoints, with BLIP's retrieval metrics.
"""
import utils  # noqa: F401,E402  (first: one clear line on an unsupported Python)
