"""Run by test_faults.py: `fault_worker.py FAULT MODULE:FUNCTION N DISTILL_ARGS...` runs `python -m training.distill
DISTILL_ARGS` with a real fault at the Nth call of MODULE.FUNCTION: FAULT "kill" SIGKILLs the process (no finally, no
atexit), "fsize" limits every file it writes from then on to 1 KiB (RLIMIT_FSIZE: each larger write fails in the OS,
EFBIG, through whatever library writes it)."""

import importlib
import os
import resource
import signal
import sys

import torch

fault, target, count, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
module_name, name = target.split(":")
module = importlib.import_module(module_name)
real, calls = getattr(module, name), []


def faults_on_the_nth_call(*args, **kwargs):
    calls.append(1)
    if len(calls) == count and fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if len(calls) == count and fault == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return real(*args, **kwargs)


setattr(module, name, faults_on_the_nth_call)
torch.set_num_threads(1)  # as the tests' own process (conftest), so both compute the same bits

from training.distill import main  # noqa: E402

sys.exit(main(argv))
