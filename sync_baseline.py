"""Synchronous online DPO: the baseline that async_online_dpo.py is measured against.

    python sync_baseline.py                          # the same run as `python async_online_dpo.py`, in lockstep
    python sync_baseline.py --batches_per_round 4    # the paper's off-policy setting: lags 0, 1, 2, 3 in turn

Everything is shared with async_online_dpo.py: the flags, the processes and their placement, the
generator, the loss and the training loop. The one difference is the method's: the generator may not
run ahead (--async_steps 0). It waits for the weights of update i before it samples batch i, so
every batch is on-policy (lag 0), and the trainer waits while it samples:

    generator | b0 (v0)  |   wait   | b1 (v1)  |   wait   | b2 (v2)  | ...
    trainer   |   wait   | train b0 |   wait   | train b1 |   wait   | ...
                                    ^ push v1             ^ push v2

Each step therefore costs generation plus training, G + T, where the asynchronous run pays about
max(G, T). With the same seed and flags both scripts sample the same prompts and make the same number
of updates. With --batches_per_round N (the paper's N) one policy version samples N batches in a row,
and the trainer trains on them in turn before the generator samples again: the synchronous but
off-policy setting of the paper's study, where the batches of a round are 0, 1, ..., N - 1 versions stale.
"""

import sys

import tyro

from async_online_dpo import Args, exit_now, main

if __name__ == "__main__":
    args = tyro.cli(
        Args, default=Args(exp_name="sync_baseline", async_steps=0), description=__doc__, use_underscores=True
    )
    if args.async_steps != 0:
        sys.exit(
            "error: sync_baseline.py always runs with --async_steps 0; use async_online_dpo.py --async_steps N to run "
            "ahead."
        )
    main(args)
    exit_now(0)  # as async_online_dpo.py ends: everything is closed, so without Python's teardown
