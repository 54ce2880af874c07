"""``python -m carp_fast.train --cfg NAME.yaml [section.key=value ...]``

NAME is a path, or a recipe shipped in carp_fast/configs/. Overrides are read as YAML
(``crops.global_scale=[0.2,1.0]``, ``train.amp=bf16``). Under torchrun every process runs
this same command.

Exit status (for requeue scripts):
  0  finished (epochs done or train.max_steps reached)
  1  crashed: an unexpected error; last.pt holds the last saved state
  2  bad config, data path or checkpoint, a run directory another trainer holds, or a
     path holding files carp_fast did not write (nothing was trained or changed)
  3  preempted by SIGTERM/SIGUSR1: the step finished and last.pt holds it; rerun to resume
  4  non-finite loss under train.nonfinite=stop: last.pt holds the last good state
  5  a checkpoint could not be written (disk full, permissions): the previous last.pt is intact
"""

from __future__ import annotations

import argparse
import logging
import sys

from carp_fast import distributed
from carp_fast.config import ConfigError, dump_config, field_docs, load_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 3
EXIT_NONFINITE = 4
EXIT_WRITE_FAILED = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m carp_fast.train",
        description="Pretrain an image encoder with CARP.",
        epilog="Run with --list-keys for every config key, its type, default and meaning.",
    )
    parser.add_argument("--cfg", default="demo_cpu.yaml", help="recipe name (carp_fast/configs/) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="section.key=value (value read as YAML)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-keys", action="store_true", help="list every config key and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = distributed.read_env()
    logging.basicConfig(
        level=logging.INFO if env.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.list_keys:
        for key, type_name, default, doc in field_docs():
            print(f"{key} ({type_name}, default {default!r}): {doc}")
        return EXIT_OK
    try:
        cfg = load_config(args.cfg, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(dump_config(cfg), end="")
        return EXIT_OK

    from carp_fast.checkpoint import CheckpointError, CheckpointWriteError
    from carp_fast.data import DataPathError
    from carp_fast.ownership import OwnershipError
    from carp_fast.run_lock import RunDirLocked
    from carp_fast.trainer import NonFiniteLoss, Preempted, Trainer, resolve_device

    try:
        env = distributed.init(resolve_device(cfg.train.device, env.local_rank).type)
        trainer = Trainer(cfg, env)
    except (DataPathError, ValueError, CheckpointError, OwnershipError, RunDirLocked) as error:
        print(f"error: {error}", file=sys.stderr)
        distributed.shutdown()
        return EXIT_USAGE
    try:
        trainer.fit()
        return EXIT_OK
    except Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NONFINITE
    except CheckpointWriteError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except CheckpointError as error:  # resume from an incompatible or unreadable last.pt
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
