"""The two jobs that turn data into models, one room each; both stand on the model library (`lumiere`) and Ray.

    ingest/   Ray Data: a raw video corpus -> Parquet shards of fixed-length, captioned, embedded clips
              (`lumiere ingest`). One module per stage, in stage order, and `job.py`, which composes them.
    train/    Ray Train: the t2i prior, the STUNet and the SSR over those shards, tracked in MLflow
              (`lumiere train`). `job.py` (the TorchTrainer job), `shards.py` (its data plans), `submit.py`.

The rooms meet only at the shard format (docs/data-format.md): ingest writes it, training reads it; neither
imports the other. Where a model comes from (a checkpoint directory, an MLflow URI) is `lumiere.model_uri`,
shared with serving.
"""
