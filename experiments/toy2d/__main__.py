"""`python -m experiments.toy2d`: run the 2-D toy experiment (see experiment.py)."""

from .experiment import main

main()
