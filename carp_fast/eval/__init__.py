"""Evaluation of frozen backbones: weighted k-NN (``carp_fast.eval.knn``), the linear
probe (``carp_fast.eval.linear``), k-means, few-shot, retrieval and copy detection
(``kmeans``, ``fewshot``, ``retrieval``, ``copydetection``), all of them at once over a
spec of data sets (``suite``), on features from ``carp_fast.eval.features``."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable


def run_cli(run: Callable[[Any], Any], args: Any) -> int:
    """What every eval command does with its parsed arguments: log to stderr, run, and
    exit 2 with the message (no traceback) on a bad checkpoint, data path or value, or an
    output path holding files carp_fast did not write."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from carp_fast.checkpoint import CheckpointError
    from carp_fast.data.folder import DataPathError
    from carp_fast.ownership import OwnershipError

    try:
        run(args)
    except (CheckpointError, DataPathError, ValueError, OwnershipError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
