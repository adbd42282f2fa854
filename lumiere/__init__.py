"""The Lumiere model library: everything a model is, trains with and generates with, and nothing that runs it.

text_encoder (open_clip), unet2d (the text-to-image prior), stunet (its space-time inflation), ssr (spatial
super-resolution), diffusion (schedule, loss, samplers), conditioning (the ⟨J, C, M⟩ tasks), multidiffusion,
style, pipeline (TextToVideo / Upsampler: generation), checkpoint, model_uri (where a model comes from),
config (+ configs/*.yaml), video (I/O), shapes (the demo corpus), storage (local / S3), trainer (TrainStep), errors.

It imports no Ray, no `pipelines`, no `serve`, no Kubernetes client, no `cli`, no `infra` — not even inside
functions (tests/test_layers.py): the jobs and the API stand on it, not the other way round.
"""
