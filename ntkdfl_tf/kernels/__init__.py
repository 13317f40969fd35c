"""Traced-NTK implementations behind one argument, and the function-space flows.

``make_kernel(fns, kind)`` returns a callable ``(weights [B,...], feats [B,N,...], mask [B,N]) ->
H [B,N,N]`` with H = (1/C) sum_c J_c J_c^T evaluated at each client's weights.

kinds:
    ``"auto"`` (default): ``"dense"`` when the model is a Dense stack, else ``"conv"`` when it
        is a chain of Conv2D / Dense / weightless per-sample layers, else ``"explicit"``.
    ``"dense"``: closed form for Dense stacks, never forms J (far cheaper: README, Performance).
    ``"conv"``: Conv2D / Dense stacks (e.g. ``nd.models.cnn``) from per-layer patches and
        per-class sensitivities, never forms J (docs/performance.md).
    ``"explicit"``: per-sample Jacobians from ``tf.GradientTape.jacobian``, any Keras model.
    ``"matrix_free"``: Dense stacks; an operator ``v -> H v`` (``.operator(weights, feats,
        mask)``) with memory linear in N, for neighbourhoods whose H does not fit in memory.
"""

from ntkdfl_tf.kernels.conv import ConvNTK, conv_stack
from ntkdfl_tf.kernels.dense import DenseNTK
from ntkdfl_tf.kernels.explicit import ExplicitNTK, jacobian
from ntkdfl_tf.kernels.matrix_free import MatrixFreeNTK
from ntkdfl_tf.kernels import losses
from ntkdfl_tf.kernels.flow import (FlowSegments, adaptive_euler_flow, adaptive_euler_segments,
                                    as_operator, client_substeps, dormand_prince_flow,
                                    dormand_prince_segments, euler_flow, euler_segments,
                                    euler_substeps, flow_stiffness, lambda_max, mse_closed_form,
                                    rkc_flow, rkc_segments)

KERNELS = {"dense": DenseNTK, "conv": ConvNTK, "explicit": ExplicitNTK,
           "matrix_free": MatrixFreeNTK}


def make_kernel(fns, kind="auto", **options):
    """Builds the traced-NTK implementation ``kind`` for the model behind ``fns``."""
    if kind == "auto":
        kind = ("dense" if fns.is_dense_stack else
                "conv" if conv_stack(fns.model) is not None else "explicit")
    if kind not in KERNELS:
        raise ValueError(f"Unknown kernel {kind!r}; choose one of auto, {', '.join(KERNELS)}.")
    if kind in ("dense", "matrix_free"):
        options.pop("chunk", None)  # only the explicit and conv kernels work in chunks
    return KERNELS[kind](fns, **options)
