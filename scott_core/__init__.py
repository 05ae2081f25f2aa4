"""SCott math in pure torch: schedule, boundary condition, teacher solvers, consistency sampler."""
