"""Latency, switch, memory and size measurements of a bundle (`rmt-deploy bench`).

May import: rmt_deploy.runtime, rmt_deploy.artifacts, rmt_deploy.errors. No torch.
"""
