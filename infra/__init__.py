"""The operators' room: the image (docker/), the KubeRay manifests (k8s/, `kubectl apply -k k8s/overlays/NAME`)
and the Python that renders and submits them (kuberay.py, behind `lumiere k8s`). Nothing in the model library,
the pipelines or serving imports it.
"""
