"""A Keras model as pure functions of explicit, client-stacked weights.

Client weights live as one tensor per trainable variable with a leading client axis
``[B, *variable.shape]``. ``ModelFunctions.forward`` evaluates B models at once: for a stack of
Dense layers (after weightless preprocessing such as Rescaling and Flatten) through batched
matrix products, for any other Keras model through ``stateless_call`` per client.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    kernel: int  # index of the kernel in model.trainable_variables
    bias: int  # index of the bias, or -1
    activation: object  # element-wise activation function


def dense_stack(model):
    """Describes ``model`` as weightless preprocessing layers followed by Dense layers.

    Returns:
        ``(prefix_layers, dense_specs)``, or None if the model is not of that form.
    """
    paths = [v.path for v in model.trainable_variables]
    prefix, specs = [], []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            if layer.kernel.path not in paths:
                return None
            bias = paths.index(layer.bias.path) if layer.use_bias else -1
            specs.append(DenseSpec(paths.index(layer.kernel.path), bias, layer.activation))
        elif layer.weights or specs:  # weights outside Dense, or a layer between Dense layers
            return None
        else:
            prefix.append(layer)
    if not specs or len(model.non_trainable_variables) or len(paths) != sum(
            1 + (s.bias >= 0) for s in specs):
        return None
    return prefix, specs


class ModelFunctions:
    """Pure, client-batched functions of one Keras architecture.

    Args:
        model: a built Keras model producing logits of shape (batch, num_classes).
    """

    def __init__(self, model):
        if not model.built:
            raise ValueError("The model must be built (give it an Input) before training.")
        self.model = model
        self.num_classes = int(model.output_shape[-1])
        self.shapes = [tuple(v.shape) for v in model.trainable_variables]
        self.num_params = int(sum(np.prod(s) for s in self.shapes))
        self._non_trainable = [v.value for v in model.non_trainable_variables]
        stack = dense_stack(model)
        if stack and getattr(stack[1][-1].activation, "__name__", "") == "softmax":
            raise ValueError("The model ends in a softmax; NTK-DFL and the trainer expect logits. "
                             "Drop the output activation (the losses apply softmax themselves).")
        self.is_dense_stack = stack is not None
        self.prefix_layers, self.dense_specs = stack if stack else ([], [])

    def initial_weights(self):
        """The model's current weights as a list of float32 NumPy arrays."""
        return [np.asarray(v.numpy(), np.float32) for v in self.model.trainable_variables]

    def features(self, x):
        """Maps raw inputs to what ``forward`` consumes: the weightless prefix for Dense stacks."""
        x = tf.cast(x, tf.float32)
        for layer in self.prefix_layers:
            x = layer(x)
        return x

    def forward(self, weights, feats):
        """Logits of B client models.

        Args:
            weights: list aligned with ``model.trainable_variables``, each ``[B, *shape]``.
            feats: ``[B, N, *feature_shape]``, or ``[N, *feature_shape]`` shared by all clients.

        Returns:
            Logits ``[B, N, C]``.
        """
        if self.is_dense_stack:
            return self.dense_forward(weights, feats)[0]
        batch = weights[0].shape[0]
        shared = feats.shape.rank == len(self.model.input_shape)
        outs = []
        for b in range(batch):  # unrolled over the (small, static) client batch
            x = feats if shared else feats[b]
            out, _ = self.model.stateless_call([w[b] for w in weights], self._non_trainable, x)
            outs.append(out)
        return tf.stack(outs)

    def dense_forward(self, weights, feats, with_derivatives=False, first_pre_activation=None):
        """Forward pass of a Dense stack, optionally keeping what the structured kernel needs.

        ``first_pre_activation``: the first layer's X W + b if the caller has it already (it is
        then not recomputed from ``feats``).

        Returns:
            ``(logits, inputs, derivatives)``: per layer its input activations ``[B, N, d_l]``
            and the activation's derivative at its pre-activation ``[B, N, h_l]``.
        """
        a = feats if feats.shape.rank == 3 else feats[None]
        inputs, derivatives = [], []
        for i, spec in enumerate(self.dense_specs):
            if i == 0 and first_pre_activation is not None:
                z = first_pre_activation
            else:
                z = tf.matmul(a, weights[spec.kernel])  # broadcasts a shared [1, N, d]
                if spec.bias >= 0:
                    z = z + weights[spec.bias][:, None, :]
            inputs.append(a)
            if not with_derivatives:
                a = spec.activation(z)
                continue
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(z)
                a = spec.activation(z)
            # element-wise activation: the gradient of sum(a) is its derivative at z
            derivatives.append(tape.gradient(a, z, output_gradients=tf.ones_like(a)))
        return a, inputs, derivatives
