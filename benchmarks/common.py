"""What the NTK-DFL benchmarks share: the setting's flags, the algorithm they build, peak RSS.

Each benchmark is a script run from the repository root (``python benchmarks/x.py``), so this
module is imported as ``common`` from the script's own folder. TensorFlow is imported only when
needed: cnn.py's watching process never loads it.
"""

import resource

import numpy as np

from absl import flags


def define_setting_flags(clients):
    """The partition, graph and NTK-DFL flags: by default paper_fast's NTK-DFL settings but
    for the flow (the library's dopri5, as every benchmark command in the docs ran unless it
    says ``--flow``) and one call in flight."""
    flags.DEFINE_integer("clients", clients, "Number of clients.")
    flags.DEFINE_integer("num_neighbors", 5, "kappa (random regular graph, < clients).")
    flags.DEFINE_float("alpha", 0.1, "Dirichlet concentration of the partition.")
    flags.DEFINE_integer("samples_per_client", 200, "Samples per client (the paper's rule).")
    flags.DEFINE_integer("jacobian_batches", 6, "NTK-DFL Jacobian batching m (1: off).")
    flags.DEFINE_integer("client_batch", 5, "NTK-DFL clients per TensorFlow call (the presets' 5).")
    flags.DEFINE_bool("jit_compile", True, "NTK-DFL: XLA-compile the evolution.")
    flags.DEFINE_integer("parallel_calls", 1, "Calls in flight at once, every algorithm "
                         "(LocalExecutor; 0: one per CPU core).")
    flags.DEFINE_string("flow", "dopri5", "NTK-DFL flow integrator: dopri5, exact, rkc, "
                        "euler_adaptive or euler_bound.")
    flags.DEFINE_list("taus", None, "NTK-DFL candidate evolution times in grid steps (default: "
                      "NTK-DFL.md's 100,...,800).")
    flags.DEFINE_float("learning_rate", 0.01, "NTK-DFL grid step eta.")
    flags.DEFINE_float("lr_decay", 0.0, "NTK-DFL: eta_r = learning_rate * exp(-lr_decay * r).")
    flags.DEFINE_integer("seed", 0, "Seed of the partition, the initial weights and the graphs.")
    flags.DEFINE_string("data_dir", None, "Original data folder (else $NTKDFL_DATA_DIR).")


def load_partition():
    """Fashion-MNIST split into the flags' Dirichlet clients; returns ``(clients, test)``."""
    import ntkdfl_tf as nd

    f = flags.FLAGS
    (x, y), test = nd.data.load("fashion_mnist", data_dir=f.data_dir)
    clients = nd.data.dirichlet_partition(x, y, f.clients, f.alpha, seed=f.seed,
                                          samples_per_client=f.samples_per_client)
    return clients, test


def setting_config(**fields):
    """An ``experiment.Config`` with the flags' NTK-DFL settings; ``fields`` add or override."""
    from ntkdfl_tf import experiment

    f = flags.FLAGS
    settings = dict(jacobian_batches=f.jacobian_batches, client_batch=f.client_batch,
                    jit_compile=f.jit_compile, flow=f.flow,
                    learning_rate=f.learning_rate, lr_decay=f.lr_decay, seed=f.seed)
    if f.taus:
        settings["taus"] = tuple(int(t) for t in f.taus)
    return experiment.Config(**{**settings, **fields})


def executor():
    """The local executor with the flags' calls in flight."""
    import ntkdfl_tf as nd

    return nd.executors.LocalExecutor(parallel_calls=flags.FLAGS.parallel_calls)


def ntkdfl(**options):
    """NTK-DFL with the flags' settings, built as the launchers build it; ``options`` override."""
    from ntkdfl_tf import experiment

    return experiment.make_algorithm(setting_config(), **options)


def peak_rss_mb():
    """This process's peak resident memory so far (it only grows)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(pid="self"):
    """A process's resident memory now (Linux ``/proc``), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for row in f:
                if row.startswith("VmRSS:"):
                    return int(row.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def save_image_grid(originals, rows, title, path, shown=None):
    """Originals on top, then one row per ``(label, images)`` (raw 0..255 units; an image that
    is None leaves its cell empty), written with ``ntkdfl_tf.io.save_figure``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ntkdfl_tf import io

    shown = shown or len(originals)
    fig, axes = plt.subplots(len(rows) + 1, shown, squeeze=False,
                             figsize=(1.2 * shown, 1.25 * (len(rows) + 1)))
    for r, (label, images) in enumerate([("original", originals)] + list(rows)):
        for k in range(shown):
            if images[k] is not None:
                axes[r, k].imshow(np.clip(images[k][..., 0], 0, 255), cmap="gray", vmin=0,
                                  vmax=255)
        axes[r, 0].set_ylabel(label.replace(":", "\n"), fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    io.save_figure(fig, path)
