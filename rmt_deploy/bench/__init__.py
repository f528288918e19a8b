"""Latency, switch, memory and size measurements of a bundle (`rmt-deploy bench`)."""
