"""Tensors of the KServe v2 protocol to and from numpy: datatypes, typed and raw contents."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
from onnxserve.server.errors import InvalidArgument

from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2

#: v2 datatype -> numpy dtype. BYTES elements are Python bytes in object arrays. BF16 has no numpy
#: type and no ONNX export here uses it, so it is refused.
NUMPY_TYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_DATATYPES = {dtype: name for name, dtype in NUMPY_TYPES.items()}

#: ONNX Runtime's type strings for graph inputs and outputs -> v2 datatype.
ORT_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}

#: v2 datatype -> its InferTensorContents field; FP16 travels only as raw contents.
_CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")


def datatype_of(dtype: np.dtype) -> str:
    """The v2 datatype of a numpy dtype; strings and bytes are BYTES."""
    if dtype.kind in "OSU":
        return "BYTES"
    return _DATATYPES[dtype.newbyteorder("=")]


def decode_inputs(request: v2.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors by name, from raw or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs: "
            "give one per input, in the order of `inputs`"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidArgument(f"input {tensor.name!r} is given twice")
        if raw and tensor.HasField("contents"):
            raise InvalidArgument(
                f"input {tensor.name!r} has contents while raw_input_contents is used: use one form for every input"
            )
        arrays[tensor.name] = decode_tensor(tensor, raw[index] if raw else None)
    return arrays


def decode_tensor(tensor: v2.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    dtype = NUMPY_TYPES.get(tensor.datatype)
    if dtype is None:
        known = ", ".join(NUMPY_TYPES)
        raise InvalidArgument(f"input {tensor.name!r}: datatype {tensor.datatype!r} is not served; use one of {known}")
    shape = tuple(tensor.shape)
    if any(size < 0 for size in shape):
        raise InvalidArgument(f"input {tensor.name!r}: shape {list(shape)} has a negative dimension")
    array = _from_contents(tensor, dtype) if raw is None else _from_raw(tensor.name, tensor.datatype, dtype, raw)
    if array.size != math.prod(shape):
        raise InvalidArgument(
            f"input {tensor.name!r}: shape {list(shape)} holds {math.prod(shape)} elements but {array.size} were given"
        )
    return array.reshape(shape)


def _from_raw(name: str, datatype: str, dtype: np.dtype, raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return _object_array(split_bytes(name, raw))
    if len(raw) % dtype.itemsize:
        raise InvalidArgument(f"input {name!r}: {len(raw)} raw bytes are not a whole number of {datatype} elements")
    # The protocol's raw contents are little-endian whatever the host.
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)


def _from_contents(tensor: v2.ModelInferRequest.InferInputTensor, dtype: np.dtype) -> np.ndarray:
    field = _CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(f"input {tensor.name!r}: {tensor.datatype} travels only in raw_input_contents")
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        return _object_array(list(values))
    try:
        return np.asarray(values, dtype=dtype)
    except OverflowError as error:
        raise InvalidArgument(f"input {tensor.name!r}: a value does not fit {tensor.datatype}") from error


def split_bytes(name: str, raw: bytes) -> list[bytes]:
    """The elements of a serialized BYTES tensor: each a 4-byte little-endian length, then its bytes."""
    values, offset = [], 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise InvalidArgument(f"input {name!r}: raw BYTES contents end inside an element's length")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidArgument(f"input {name!r}: a raw BYTES element runs past the end of its contents")
        values.append(raw[offset : offset + length])
        offset += length
    return values


def _object_array(values: list[bytes]) -> np.ndarray:
    # np.array(values, dtype=object) would make a 2-D array of equal-length bytes sequences.
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def encode_outputs(response: v2.ModelInferResponse, outputs: dict[str, np.ndarray]) -> None:
    """Adds the outputs to the response as raw contents, as Triton answers."""
    for name, array in outputs.items():
        datatype = datatype_of(array.dtype)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(to_raw(array, datatype))


def to_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        elements = [v.encode() if isinstance(v, str) else bytes(v) for v in array.flat]
        return b"".join(_LENGTH.pack(len(e)) + e for e in elements)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def select_outputs(outputs: dict[str, np.ndarray], requested: Sequence[str], model: str) -> dict[str, np.ndarray]:
    """The requested outputs in the order asked, or every output when none is named."""
    unknown = [name for name in requested if name not in outputs]
    if unknown:
        raise InvalidArgument(f"model {model!r} has no output {unknown}; its outputs are {list(outputs)}")
    return {name: outputs[name] for name in requested} if requested else outputs
