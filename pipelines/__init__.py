"""Ray Data ingestion (decode → filter → caption-embed → shard) and Ray Train jobs (t2i, stunet, ssr).

Not built yet: see the README's status table. The training step they will share already lives in
`lumiere.trainer.TrainStep`.
"""
