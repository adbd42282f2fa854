"""Ray Serve application: the OpenAI-compatible Videos API over `lumiere.pipeline`.

Modules: `app` (build_app, the YAML's import_path), `api` (FastAPI ingress), `deployments` (TextEncoder,
Generator, Upsampler), `jobs` (SQL job store), `artifacts` (local/S3 content), `models` (where weights come from).
The Serve config is `serve/config.yaml` (the RayService embeds its copy, infra/k8s/base/serve-config.yaml).
It stands on the model library only: no training code (`pipelines`) is imported (tests/test_layers.py).
"""
