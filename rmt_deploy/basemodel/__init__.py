"""The base model, in torch: open_clip loading, checkpoint files, the weights a task masks.

loading (a base is the pair model name + pretrained tag or checkpoint, built through open_clip's
factory), checkpoint_files (what a local checkpoint says about its format and activation),
model_configs/ (the tiny architectures tests and the demo use). Needs the `train` extra.
May import: rmt_deploy.artifacts, rmt_deploy.errors.
"""
