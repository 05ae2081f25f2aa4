"""The 2-D toy: SCott's synthetic claim (SDE vs ODE teacher) on a Gaussian mixture whose score is exact.

    python -m experiments.toy2d [--quick]
"""
