"""Test harness only (not part of prefopt): accelerate 1.16 enables FSDP only on GPU-type devices, so
on a CPU an FSDP launch comes up as lone processes. On the processes of a CPU data-parallel launch
(gloo) that carry an FSDP plugin, this turns accelerate's state into FSDP, so that accelerate's own
FSDP2 code (fully_shard per layer, sharded optimizer state, save_state/load_state, get_state_dict)
runs on the CPU with prefopt around it. Loaded through PYTHONPATH by tests/test_distributed.py.

It also ends these processes without the interpreter's C++ teardown: with torch 2.13, FSDP2 over gloo
aborts a rank there ("terminate called without an active exception", SIGABRT) in about 1 launch in 30
here, after the run has finished and written everything (tests/fsdp2_worker.py leaves the same way)."""
import os

if os.environ.get("PREFOPT_TEST_FSDP_ON_CPU"):
    import atexit
    import sys

    status = [0]
    _exit, _excepthook = sys.exit, sys.excepthook

    def recording_exit(code=None):
        status[0] = 0 if code is None else code if isinstance(code, int) else 1
        _exit(code)

    def excepthook(*args):
        status[0] = 1
        _excepthook(*args)

    def leave() -> None:
        # registered before anything else, so it runs after every other exit handler (logging's included)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status[0])

    sys.exit, sys.excepthook = recording_exit, excepthook
    atexit.register(leave)

    import accelerate.state as state
    from accelerate.utils import DistributedType

    _init = state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = __init__
