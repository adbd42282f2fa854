"""Ingestion (`lumiere ingest`): a raw video corpus -> Parquet shards of fixed-length clips, on Ray Data.

One module per stage, in stage order, each a plain function or class over a row or a batch (testable without Ray):

    config.py          IngestConfig: what every stage reads (sizes, fps, filters, encoder, resources)
    stage1_list.py     driver: list videos under a URI, attach captions (sidecar or .txt/.json beside)
    stage2_decode.py   per file: probe → decode → shots → clips → filters → crops (frame functions: curation.py)
    stage3_embed.py    actor: open_clip caption/keyframe embeddings, CLIP score (and its filter)
    stage4_write.py    per batch: one Parquet shard + one rejects part, written atomically; the shard schema
    job.py             run_ingest: the Ray Data pipeline that composes the stages, resume, manifest, report

Importing this package imports nothing: Ray Data workers import only the stage they run.
"""
