"""Serving: Triton Inference Server over one Engine per process, and the request/response mapping
(protocol.py) that every rmt-deploy server shares. Nothing here imports torch."""
