"""The inference path: a trained network made fast, and proof that it computes the same function.

One module per step, in the order a network goes through them:

* :mod:`~resunit.deploy.folding` — BatchNorm folded into the convolutions;
* :mod:`~resunit.deploy.inference` — :func:`optimize`: channels_last, fused ReLUs, compiled
  (inductor, oneDNN Graph, or a plan of oneDNN primitives: :mod:`~resunit.deploy.onednn_plan`,
  built by :mod:`~resunit.deploy.native_build`), large batches in cache-sized pieces
  (:mod:`~resunit.deploy.cache_pieces`);
* :mod:`~resunit.deploy.onnx_export` — ONNX export verified in ONNX Runtime;
* :mod:`~resunit.deploy.int8` — post-training static int8 (ONNX Runtime or PT2E);
* :mod:`~resunit.deploy.throughput` — every way of running it, timed side by side.

(:mod:`~resunit.deploy.module_surgery` swaps one kind of submodule for another, for the steps.)

Everything here returns *new* modules and leaves the trained model untouched, and every
transformation is checked against the model it came from: a faster network is only useful if
it computes the same function. Import from ``resunit.deploy``; the modules are its chapters.

Threads: the inference models (:class:`InferenceModel`, :class:`OneDnnGraphModel`,
:class:`OneDnnPlanModel`, :class:`OnnxRuntimeModel`) may be called from several threads at
once (a plan's calls take turns); building them
(:func:`optimize`, :func:`export_onnx`, :func:`quantize` …) is meant for one thread.
"""

from __future__ import annotations

from resunit.allocator import retain_freed_memory  # also for training
from resunit.analysis import check_input_channels, count_multiply_adds, parse_input_shape
from resunit.deploy.cache_pieces import cache_sized_batch, last_level_cache_bytes, unit_working_set
from resunit.deploy.folding import fold_batchnorm, fold_conv_bn, relative_difference
from resunit.deploy.inference import (
    COMPILE_OPTIONS,
    COMPILERS,
    MAX_ONEDNN_GRAPHS,
    InferenceModel,
    OneDnnGraphModel,
    OneDnnPlanModel,
    PerShapeModel,
    compile_works,
    onednn_graph_works,
    optimize,
    pad_shortcuts_as_convolutions,
)
from resunit.deploy.int8 import (
    calibration_sample,
    pt2e_available,
    quantize,
    quantize_pt2e,
)
from resunit.deploy.onednn_plan import OneDnnPlan, onednn_plan_works
from resunit.deploy.onnx_export import (
    ONNX_INPUT_NAME,
    ONNX_OPSET,
    ONNX_OUTPUT_NAME,
    ONNX_TOLERANCE,
    OnnxCheck,
    OnnxRuntimeModel,
    export_onnx,
    onnx_available,
    onnxruntime_session,
    require_onnx,
    verify_onnx,
)
from resunit.deploy.throughput import (
    FLOAT32_VARIANTS,
    VARIANT_DESCRIPTIONS,
    VARIANTS,
    PairedRatio,
    Timing,
    Variant,
    build_variants,
    compare_variants,
    measure_interleaved,
    openmp_threads_spin,
    paired_ratio,
)
from resunit.errors import DeployError

__all__ = [
    "COMPILERS",
    "COMPILE_OPTIONS",
    "FLOAT32_VARIANTS",
    "MAX_ONEDNN_GRAPHS",
    "ONNX_INPUT_NAME",
    "ONNX_OPSET",
    "ONNX_OUTPUT_NAME",
    "ONNX_TOLERANCE",
    "VARIANTS",
    "VARIANT_DESCRIPTIONS",
    "DeployError",
    "InferenceModel",
    "OneDnnGraphModel",
    "OneDnnPlan",
    "OneDnnPlanModel",
    "OnnxCheck",
    "OnnxRuntimeModel",
    "PairedRatio",
    "PerShapeModel",
    "Timing",
    "Variant",
    "build_variants",
    "cache_sized_batch",
    "calibration_sample",
    "check_input_channels",
    "compare_variants",
    "compile_works",
    "count_multiply_adds",
    "export_onnx",
    "fold_batchnorm",
    "fold_conv_bn",
    "last_level_cache_bytes",
    "measure_interleaved",
    "onednn_graph_works",
    "onednn_plan_works",
    "onnx_available",
    "onnxruntime_session",
    "openmp_threads_spin",
    "optimize",
    "pad_shortcuts_as_convolutions",
    "paired_ratio",
    "parse_input_shape",
    "pt2e_available",
    "quantize",
    "quantize_pt2e",
    "relative_difference",
    "require_onnx",
    "retain_freed_memory",
    "unit_working_set",
    "verify_onnx",
]
