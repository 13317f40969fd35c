"""What a neighbour recovers from one Jacobian package, per codec (``ntkdfl_tf.privacy``).

    python benchmarks/privacy.py --figure=docs/figures/reconstruction.png

Takes a client's first ``--images`` Fashion-MNIST training images, forms the package its
neighbour would receive (the paper's MLP at the run's initial weights), encodes it with each
codec, reconstructs the inputs as the receiver would and prints one JSON line per codec: the
median and worst PSNR over the images (dB, [0, 1] pixel units; inf = exact), the largest pixel
error, the share of images recovered and of labels carried. Writes a figure of originals and
recoveries.
"""

import json

import common
import keras
import numpy as np
from absl import app, flags

import ntkdfl_tf as nd
from ntkdfl_tf import functional, privacy
from ntkdfl_tf.protocol import codecs

flags.DEFINE_integer("images", 8, "Samples in the package.")
flags.DEFINE_list("codecs", ["identity", "factored", "quantize:bits=8", "quantize:bits=4",
                             "quantize:bits=2", "topk:fraction=0.1", "topk:fraction=0.01",
                             "subsample:fraction=0.25"], "Codecs to try.")
flags.DEFINE_string("figure", None, "Where to write the figure (.png); none if unset.")
flags.DEFINE_string("data_dir", None, "Original data folder (else $NTKDFL_DATA_DIR).")
FLAGS = flags.FLAGS


def received(codec, full, rng):
    """What the receiver holds: the samples sent, their decoded arrays (factored is exact)."""
    n = full.num_samples
    keep = np.arange(n)
    if codec.stage("subsample"):
        keep = np.sort(rng.choice(n, codec.kept_samples(n), replace=False))
    jac = [codecs.encode_values(codec, j[keep], rng) if codec.changes_values else j[keep]
           for j in full.jacobians]
    lazy = nd.protocol.JacobianPackage(0, 1, nd.protocol.package_specs(len(keep), 10,
                                                                        [j.shape[2:] for j in jac]))
    return keep, lazy.materialise(jac, full.logits[keep], full.labels[keep])


def main(argv):
    del argv
    (x, y), _ = nd.data.load("fashion_mnist", data_dir=FLAGS.data_dir)
    images, labels = x[:FLAGS.images], y[:FLAGS.images]
    keras.utils.set_random_seed(0)  # reproducible initial weights
    fns = functional.ModelFunctions(nd.models.mlp())
    full = privacy.jacobian_package(fns, fns.initial_weights(), images, labels)
    rng = np.random.default_rng(0)
    rows = []
    for spec in FLAGS.codecs:
        codec = codecs.parse(spec)
        keep, got = received(codec, full, rng)
        rec = privacy.reconstruct(got, fns)
        recovered = np.zeros_like(images, np.float64)
        recovered[keep] = np.clip(rec.inputs / 255.0, 0, 1)
        quality = privacy.psnr(images[keep] / 255.0, recovered[keep])
        line = {"codec": spec, "images_sent": int(len(keep)), "images": FLAGS.images,
                "psnr_median_db": float(np.median(quality)), "psnr_worst_db": float(quality.min()),
                "max_pixel_error": float(np.abs(recovered[keep] - images[keep] / 255.0).max()),
                "labels_carried": int(np.sum(rec.labels == labels[keep]))}
        print(json.dumps(line), flush=True)
        rows.append((spec, keep, recovered))
    if FLAGS.figure:
        shown = min(6, FLAGS.images)
        common.save_image_grid(
            images, [(spec, [255 * recovered[k] if k in keep else None for k in range(shown)])
                     for spec, keep, recovered in rows],
            "What a neighbour recovers from one Jacobian package (MLP, Fashion-MNIST)",
            FLAGS.figure, shown)
        print(json.dumps({"figure": FLAGS.figure}))

if __name__ == "__main__":
    app.run(main)
