"""Serving: the tasks of a bundle behind Triton Inference Server or a Ray Serve cluster.

protocol (the KServe v2 request/response mapping every server shares), triton_model (the
Python-backend model hosting one Engine), triton_repo (model repositories), tritonserver (the
server binary), launch (`serve` until SIGTERM), kserve_http, metrics, ray* (the Ray Serve app).
May import: rmt_deploy.runtime, rmt_deploy.export (the repository export only),
rmt_deploy.artifacts, rmt_deploy.errors. Nothing here imports torch.
"""
