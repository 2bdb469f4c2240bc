"""One-node ONNX models for the ONNX Runtime peer.

Contract: :func:`onnx_model` returns the serialized ``ModelProto`` bytes of a
graph holding a single ``com.microsoft`` operator (opset 17 plus the
``com.microsoft`` domain version 1), built with the ``onnx`` package, which is
imported here only, on the first model built: a bench run without the ONNX
Runtime peer never pays for it.  Inputs and outputs are ``(name, elem,
shape)`` with ``elem`` one of :data:`ELEM`; an input named ``""`` is an
omitted optional input.
"""

from __future__ import annotations

ELEM = ("float32", "float16", "int32")


def onnx_model(op, inputs, outputs, attrs):
    """ModelProto bytes of one ``com.microsoft`` node ``op`` with attributes
    ``attrs`` (ints or floats)."""
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int32": TensorProto.INT32}

    def value_info(name, dt, shape):
        return helper.make_tensor_value_info(name, elem[dt], list(shape))

    node = helper.make_node(op, [n for n, _, _ in inputs], [n for n, _, _ in outputs], name="attn",
                            domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "fastqkv_bench", [value_info(*x) for x in inputs if x[0]],
                              [value_info(*x) for x in outputs])
    model = helper.make_model(graph, producer_name="fastqkv", ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()
