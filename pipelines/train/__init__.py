"""Training (`lumiere train {t2i,stunet,ssr}`): Ray Train jobs over the ingestion shards, tracked in MLflow.

    job.py      run_training: the driver (checks, MLflow run, TorchTrainer, registration) and the worker loop
                (`lumiere.trainer.TrainStep`, the step shared with the demo and the benchmarks)
    shards.py   reading the shards: manifest checks, each worker's seeded data plan, the Ray Data loader
    submit.py   `lumiere train … --address http://HOST:8265`: the same command through the Ray Jobs API

Importing this package imports nothing: the workers import what they run.
"""
