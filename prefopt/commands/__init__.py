"""Sub-commands of the `prefopt` CLI beyond train/sft/eval, one module each (see prefopt.cli)."""
