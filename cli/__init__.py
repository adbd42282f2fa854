"""The front door: the `lumiere` command (main.py), its `lumiere k8s` group (k8s.py) and `lumiere demo`
(demo.py). It sits above every stage — the model library (`lumiere`), ingestion and training (`pipelines`),
serving (`serve`), the cluster (`infra`) — and nothing below imports it. Each command is thin: parse the
options, call the stage's library function, print.
"""
