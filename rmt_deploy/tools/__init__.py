"""Tools over existing files, numpy only: bundle editing (`bundle add|remove`) and the summaries `inspect` prints.

May import: rmt_deploy.runtime (the task reader that checks a task against its base),
rmt_deploy.artifacts, rmt_deploy.errors. Never torch.
"""
