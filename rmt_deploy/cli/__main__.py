"""`python -m rmt_deploy.cli ...` (what `torchrun -m rmt_deploy.cli train ...` runs)."""
from rmt_deploy.cli import main

main()
