"""What gradient matching recovers from one Jacobian package (``privacy.match_gradients``).

    python benchmarks/privacy_cnn.py --figure=docs/figures/reconstruction_cnn.png

The CNN's first layer is a convolution, so ``privacy.reconstruct``'s exact ratio does not
apply: the receiver searches for inputs whose per-sample Jacobians at its averaged weights match
the package's. Takes a client's first ``--images`` Fashion-MNIST training images, forms the
package at the model's seeded initial weights, and runs the search for each step count, for the
CNN (plain, and after the ``--codec`` the package travels with) and for the MLP (whose exact
answer ``reconstruct`` gives, as a check that the search converges). Prints one JSON line per
setting: the median and worst PSNR over the images (dB, [0, 1] pixel units), the median final
Jacobian distance, the wall seconds of the search; first the PSNR of two trivial guesses (the
search's starting noise and the training set's mean pixel). Writes a figure of originals and
recoveries.
"""

import json
import time

import common
import keras
import numpy as np
from absl import app, flags

import ntkdfl_tf as nd
from ntkdfl_tf import functional, privacy
from ntkdfl_tf.protocol import codecs

flags.DEFINE_integer("images", 8, "Samples in the package.")
flags.DEFINE_list("steps", ["100", "300", "1000"], "Optimiser step counts to try.")
flags.DEFINE_list("models", ["cnn", "mlp"], "Models to attack.")
flags.DEFINE_string("codec", "quantize:bits=8", "A lossy codec also tried on the CNN's package "
                    "(at the middle step count); empty: none.")
flags.DEFINE_integer("seed", 0, "Seed of the initial weights and of the starting noise.")
flags.DEFINE_string("figure", None, "Where to write the figure (.png); none if unset.")
flags.DEFINE_string("data_dir", None, "Original data folder (else $NTKDFL_DATA_DIR).")
FLAGS = flags.FLAGS


def report(images, line, inputs):
    quality = privacy.psnr(images / 255.0, np.clip(inputs / 255.0, 0, 1))
    line.update(psnr_median_db=round(float(np.median(quality)), 2),
                psnr_worst_db=round(float(quality.min()), 2))
    print(json.dumps(line), flush=True)


def main(argv):
    del argv
    (x, y), _ = nd.data.load("fashion_mnist", data_dir=FLAGS.data_dir)
    images, labels = x[:FLAGS.images], y[:FLAGS.images]
    steps = [int(s) for s in FLAGS.steps]
    mean = np.full(images.shape, float(x.mean()))
    rows = []
    for name in FLAGS.models:
        keras.utils.set_random_seed(FLAGS.seed)
        fns = functional.ModelFunctions(nd.models.MODELS[name]())
        weights = fns.initial_weights()
        plain = privacy.jacobian_package(fns, weights, images, labels)
        settings = [("identity", plain, s) for s in steps]
        if name == "cnn" and FLAGS.codec:
            codec, rng = codecs.parse(FLAGS.codec), np.random.default_rng(FLAGS.seed)
            coded = plain.materialise(
                [codecs.encode_values(codec, j, rng) for j in plain.jacobians], plain.logits,
                plain.labels)
            settings.append((FLAGS.codec, coded, steps[len(steps) // 2]))
        start = privacy.match_gradients(plain, fns, weights, steps=0, seed=FLAGS.seed)
        for guess, inputs in (("starting noise", start.inputs), ("mean pixel", mean)):
            report(images, {"model": name, "guess": guess, "images": FLAGS.images}, inputs)
        for spec, received, count in settings:
            began = time.perf_counter()
            got = privacy.match_gradients(received, fns, weights, steps=count, seed=FLAGS.seed)
            line = {"model": name, "codec": spec, "steps": count, "images": FLAGS.images,
                    "jacobian_distance_median": float(f"{np.median(got.distance):.4g}"),
                    "wall_seconds": round(time.perf_counter() - began, 1)}
            report(images, line, got.inputs)
            rows.append((f"{name} {spec}\n{count} steps", got.inputs))
    if FLAGS.figure:
        common.save_image_grid(
            images, [(f"{title}", list(inputs)) for title, inputs in rows],
            "Gradient matching on one Jacobian package (Fashion-MNIST, initial weights)",
            FLAGS.figure)
        print(json.dumps({"figure": FLAGS.figure}))

if __name__ == "__main__":
    app.run(main)
