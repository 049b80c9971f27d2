"""Work over the chunks of a source while its cache is built (decoding images, checking files), in order:
in streaming Ray Data tasks when a Ray session is up, so that a large source is decoded on every CPU
of the cluster and never in the driver; in this process otherwise (small sources, the plain loop).

dd_dist.infra.cluster.open_split starts a Ray session for a build whose source decodes images (hf:,
imagefolder). A chunk's UserError travels back as a value and is raised here, still one line.
"""
from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from functools import partial
from typing import Any

from dd_dist.errors import UserError

READ_AHEAD_MB = 256  # decoded chunks Ray Data may hold ahead of the writer


def ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # not imported: no session is up either
    return ray is not None and ray.is_initialized()


def in_order(work: Callable[[Any], Any], items: list) -> Iterator:
    """work(item) for each item, in the items' order."""
    if not ray_is_up() or len(items) < 2:
        yield from map(work, items)
        return
    from ray.data import ExecutionResources, range as ray_range  # heavy: only where a session is up

    chunks = ray_range(len(items), override_num_blocks=len(items))
    options = chunks.context.execution_options
    options.preserve_order = True
    options.resource_limits = ExecutionResources.for_limits(object_store_memory=READ_AHEAD_MB * 2**20)
    chunks.context.enable_progress_bars = False  # the caller shows its own progress
    with closing(iter(chunks.map_batches(partial(_run, work, items), batch_size=1).iter_batches(batch_size=1))) as done:
        for batch in done:  # closed on an error too, while Ray is still up
            if batch["error"][0]:
                raise UserError(batch["error"][0])
            yield pickle.loads(batch["result"][0])


def _run(work: Callable, items: list, batch: dict) -> dict:
    """One chunk in a Ray Data task; its result pickled (any Python value), or the cause of its UserError."""
    try:
        return {"result": [pickle.dumps(work(items[int(batch["id"][0])]))], "error": [""]}
    except UserError as e:
        return {"result": [b""], "error": [str(e)]}
