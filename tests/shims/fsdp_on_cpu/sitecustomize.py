"""Test harness only (not part of prefopt): accelerate 1.16 enables FSDP only on GPU-type devices, so
on a CPU an FSDP launch comes up as lone processes. On the processes of a CPU data-parallel launch
(gloo) that carry an FSDP plugin, this turns accelerate's state into FSDP, so that accelerate's own
FSDP2 code (fully_shard per layer, sharded optimizer state, save_state/load_state, get_state_dict)
runs on the CPU with prefopt around it. Loaded through PYTHONPATH by tests/test_distributed.py."""
import os

if os.environ.get("PREFOPT_TEST_FSDP_ON_CPU"):
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
