"""A stream decoded alone and beside batchmates that join and leave, on the fused decoder's shared
buffers the way the scheduler runs them: rows in use contiguous from 0, a newcomer prefilled alone
into the next free row, a leaving row's place taken by the last row, the freed row's memory
released. Imported by the tests, and run as a script on an emulated CPU
(tests/test_decode_invariance.py), so it needs only numpy and the server's modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnxserve.server.runtime.sessions import Session, SessionSettings
from onnxserve.server.tasks.generation.fused import FusedBatch, FusedGraph

STEPS = 8
PROMPT = [5, 17, 33, 2]
# Step -> the prompt of the batchmate that joins before it; step -> the row that leaves before it.
# So the stream decodes alone (step 1 of the solo run, 6 to 8), beside one (1, 4, 5) and two (2, 3)
# batchmates, and a batchmate moves from row 2 into row 1 before step 4.
JOINS = {1: [9, 4, 71], 2: [12]}  # a one-token prompt: its prefill is one row, one token
LEAVES = {4: 1, 6: 1}


def open_graph(path: Path) -> FusedGraph:
    return FusedGraph(Session(path, SessionSettings(intra_op_threads=1)))


def stream_logits(graph: FusedGraph, beside: bool) -> np.ndarray:
    """The stream's logits after its prompt and after each of STEPS greedy steps, in row 0: alone,
    or beside the batchmates of JOINS and LEAVES, whose tokens are their own greedy choices."""
    batch = FusedBatch(graph, rows=3, length=max(map(len, [PROMPT, *JOINS.values()])) + STEPS + 1)
    latest = [batch.prefill(0, [PROMPT])[0]]  # each row's latest logits, in row order
    stream = [latest[0]]
    for step in range(1, STEPS + 1):
        if beside and step in JOINS:
            latest.append(batch.prefill(len(latest), [JOINS[step]])[0])
        if beside and step in LEAVES:
            row, moved = LEAVES[step], latest.pop()
            if row < len(latest):  # the last row moves into the hole, cache and all
                batch.copy_rows(np.array([len(latest)]), np.array([row]))
                latest[row] = moved
            batch.release(len(latest))  # the freed row's memory goes back
        latest = list(batch.decode(np.array([int(logits.argmax()) for logits in latest])))
        stream.append(latest[0])
    return np.stack(stream)


def alone_and_beside(graph: FusedGraph) -> dict[str, np.ndarray]:
    return {"alone": stream_logits(graph, beside=False), "beside": stream_logits(graph, beside=True)}
