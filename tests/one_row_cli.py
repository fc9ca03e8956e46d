"""Test harness only (not part of prefopt): ``prefopt`` with the GPU's one-row layout forced on a CPU.

On CUDA with FlexAttention a micro-batch's segments go into one row and a micro-batch's rows run in one
forward (prefopt.train.one_row, rows_together). Neither switches on here, and FlexAttention has no
backward on a CPU, so this forces the layout through the SDPA-per-segment kernel: the loop, the
reference table, accumulation, evaluation and several processes then run it as a GPU would.
Used in-process by tests/test_train.py and as the launched script by tests/test_distributed.py."""
import sys

import prefopt.train


def force_one_row(set_attr=setattr) -> None:
    """``set_attr``: pytest's ``monkeypatch.setattr`` in-process, so that the test undoes it."""
    set_attr(prefopt.train, "rows_together", lambda device: True)
    set_attr(prefopt.train, "one_row", lambda cfg, device: prefopt.train.block_attention_packed(cfg))


if __name__ == "__main__":
    force_one_row()
    from prefopt import cli

    sys.exit(cli.main())
