"""A graph's first row computed alone (one row) and beside batchmates (three rows), every output
but those named: whether MatMulNBits gives a row the same bits at any batch size. Imported by the
tests, and run as a script on an emulated CPU (tests/test_gguf_exact.py), so it needs only numpy
and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


def first_row_alone_and_beside(graph: str, width: int, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """{"alone_<output>": row, "beside_<output>": row} for the graph's input `x` [1, rows, width]
    (and a zero `input_ids` [1, 1]), on two intra-op threads as the server runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 3, width)).astype(np.float32)
    ids = np.zeros((1, 1), dtype=np.int64)
    names = [output.name for output in session.get_outputs()]
    found = {}
    for label, rows in (("alone", x[:, :1]), ("beside", x)):
        for name, value in zip(names, session.run(None, {"input_ids": ids, "x": rows}), strict=True):
            if name not in skip:
                found[f"{label}_{name}"] = value[0, 0]
    return found
