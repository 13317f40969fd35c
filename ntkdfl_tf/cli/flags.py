"""Flags shared by the commands: one flag per ntkdfl_tf.experiment.Config field.

Unset flags (None) fall back to the preset, then to the Config default.
"""

import dataclasses
import sys

from absl import app, flags, logging

from ntkdfl_tf import experiment

_D = experiment.Config()
_HELP = {
    "algorithm": "ntk_dfl, dfedavg, dfedavgm, dpsgd, dfedsam or dispfl.",
    "dataset": "fashion_mnist, mnist (offline from their IDX files) or any tfds image "
               "classification dataset with image and label features, e.g. kmnist.",
    "data_dir": "Folder with the original IDX .gz files (else $NTKDFL_DATA_DIR, Debian's "
                "folder, then tfds).",
    "model": "mlp or cnn.", "hidden": "MLP hidden width.", "num_clients": "Number of clients.",
    "partition": "dirichlet, iid or shards.", "alpha": "Dirichlet concentration.",
    "samples_per_client": "Samples per client, the paper's rule (dirichlet, iid); 0 splits the "
                          "whole training set disjointly.",
    "topology": "random (kappa-regular, redrawn each round), erdos_renyi, ring or full.",
    "num_neighbors": "Degree kappa of the random graph.",
    "edge_probability": "Erdos-Renyi edge probability.", "rounds": "Communication rounds.",
    "learning_rate": "NTK-DFL grid step eta.",
    "lr_decay": "NTK-DFL: eta_r = learning_rate * exp(-lr_decay * r).",
    "taus": "NTK-DFL candidate evolution times, in grid steps.", "loss": "cross_entropy or mse.",
    "kernel": "auto (dense for Dense stacks, conv for Conv2D/Dense chains, else explicit), dense, "
              "conv, explicit or matrix_free.",
    "per_round_averaging": "Neighbour averaging each round (off: the paper's ablation).",
    "packages": "NTK-DFL Jacobian packages: lazy (evaluated from the senders' samples, no J "
                "formed) or explicit (J, logits and labels formed as arrays per slice).",
    "jacobian_batches": "NTK-DFL Jacobian batching m: evolve slice after slice (1: off).",
    "client_batch": "NTK-DFL clients evolved in one TensorFlow call (with jacobian_batches > 1 "
                    "and jit_compile, 30-60 is fastest on CPU).",
    "jacobian_chunk": "NTK-DFL explicit kernel (e.g. the CNN): samples per Jacobian block; "
                      "memory ~2 x chunk x classes x params floats (set it >= the "
                      "neighbourhood's samples to compute each Jacobian once).",
    "jit_compile": "NTK-DFL: compile the per-client evolution with XLA.",
    "flow": "NTK-DFL cross-entropy flow integrator: dopri5 (Dormand-Prince, rtol 1e-4), exact "
            "(the same, rtol 1e-6), rkc (Runge-Kutta-Chebyshev, rtol 1e-3: fewer products with "
            "H on long, stiff flows), euler_adaptive (Euler steps from the flow's stiffness, "
            "redone with the bound if the flow loss rises) or euler_bound (lambda_max(H/N)/2).",
    "flow_budget": "NTK-DFL compute bound: a slice whose kernel asks more Euler sub-steps per "
                   "grid step than this (eta lambda_max(H/N)/2, e.g. a Byzantine-inflated "
                   "kernel) is not evolved; 0: no bound.",
    "tau_search": "NTK-DFL candidate taus: full (flow to the largest tau, every candidate "
                  "evaluated) or early_stop (each client stops once its candidates' real loss "
                  "rose for two taus in a row; a client batch stops when all its clients have).",
    "local_learning_rate": "Baselines: local SGD learning rate.",
    "batch_size": "Baselines: local batch size.",
    "local_epochs": "Baselines (D-PSGD included): local epochs.",
    "local_steps": "Baselines: a fixed number of local steps per round instead of "
                   "--local_epochs (1 with --algorithm=dpsgd: Lian et al.'s one-step D-PSGD).",
    "momentum": "DFedAvgM: momentum.", "sam_rho": "DFedSAM: SAM radius.",
    "sparsity": "DisPFL: share of each client's weights its sparse mask leaves out (0.5).",
    "dropout": "Probability that a client sits out a round (neither sends nor updates).",
    "message_loss": "Probability that a directed link fails in a round (the channel loses "
                    "every message over it).",
    "leave": "Clients that leave for good, as client:round pairs, e.g. 3:5,7:10.",
    "codec": "NTK-DFL Jacobian packages on the wire: identity, factored (lossless), "
             "quantize:bits=8, topk:fraction=0.1, subsample:fraction=0.25, joined by + in "
             "that order (subsample, factored, topk, quantize).",
    "weight_codec": "Weight messages on the wire: identity, quantize:bits=8, topk:fraction=0.1 "
                    "(or both, joined by +).",
    "byzantine_fraction": "Share of Byzantine clients in [0, 1) (drawn once from the seed).",
    "attack": "What Byzantine clients send: none, sign_flip, gaussian, scaling, alie, ipm, "
              "dissensus, adaptive; NTK-DFL packages: jacobian_scale, jacobian_sign_flip, "
              "jacobian_noise, logit_shift, label_flip.",
    "attack_params": "The attack's parameters as key=value,..., e.g. epsilon=100.",
    "defence": "How receivers average and screen: none, median, trimmed_mean, clipping, "
               "balance, screen (NTK-DFL packages), or <rule>+screen.",
    "defence_params": "The defence's parameters as key=value,..., e.g. f=1 or clip_ratio=4.",
    "final_aggregation": "Final model: mean of every client, or robust (clients near the "
                         "coordinate-wise median; the kept ones are logged).",
    "resume": "Continue from <logdir>/checkpoint.npz if it exists (--noresume: start afresh).",
    "executor": "local (this process) or ray (Ray actors; pip install 'ntkdfl_tf[ray]').",
    "parallel_calls": "Local executor: calls in flight at once, each on its own thread; 0 "
                      "(auto): one per CPU core for XLA-compiled NTK-DFL calls (each runs on "
                      "one core), else 1. Same results, more memory.",
    "ray_address": "Ray cluster to join (auto, ray://host:10001); unset starts a local one.",
    "ray_actors": "Ray actors holding client groups.",
    "seed": "Root seed.", "logdir": "Where history.csv and TensorBoard events go.",
    "save_dir": "Where the aggregated .keras model goes.",
    "run_name": "Model file name (default: the logdir's last part).",
    "verbose": "0 silent, 1 progress bar, 2 one line per round.",
    "stop_at_accuracy": "Stop once the aggregated model reaches this test accuracy (0: never).",
    "client_metrics_every": "Rounds between evaluations of every client model and the "
                            "honest-client metrics (the aggregate is evaluated every round; "
                            "also on the last round and the one that reaches "
                            "--stop_at_accuracy).",
}


def define(skip=()):
    """Defines ``--preset`` and one flag per Config field not in ``skip``."""
    flags.DEFINE_enum("preset", "quick", list(experiment.PRESETS), "Starting configuration.")
    for field in dataclasses.fields(experiment.Config):
        if field.name in skip:
            continue
        default = getattr(_D, field.name)
        help_text = f"{_HELP[field.name]} (default {default})"
        if field.name == "taus":
            flags.DEFINE_list(field.name, None, help_text)
        elif field.type is bool:
            flags.DEFINE_boolean(field.name, None, help_text)
        elif field.type is int:
            flags.DEFINE_integer(field.name, None, help_text)
        elif field.type is float:
            flags.DEFINE_float(field.name, None, help_text)
        else:
            flags.DEFINE_string(field.name, None, help_text)


def config_values(skip=()):
    """The preset's values overridden by every flag the user set, as a dict."""
    values = dict(experiment.PRESETS[flags.FLAGS.preset])
    for field in dataclasses.fields(experiment.Config):
        if field.name in skip:
            continue
        value = flags.FLAGS[field.name].value
        if value is not None:
            values[field.name] = tuple(int(t) for t in value) if field.name == "taus" else value
    return values


def run(main, doc):
    """``absl.app.run(main)`` as a command: ``doc`` is the ``--help`` text (with a line on
    ``--flagfile``), ``--helpshort`` lists the command's flags, and a bad value ends it with one line ``error: ...`` (no
    traceback)."""
    sys.modules["__main__"].__doc__ = (doc + "\n--flagfile=FILE reads flags from a file, one "
                                       "--flag=value per line (later flags win).\n")
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
        if module.startswith("ntkdfl_tf.cli"):
            for flag in module_flags:
                flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def checked_main(argv):
        logging.set_verbosity(logging.WARNING)  # tfds reports every file it reads at INFO
        try:
            main(argv)
        except (ValueError, OSError, RuntimeError, ArithmeticError) as e:  # one clear line
            sys.exit(f"error: {e}")

    app.run(checked_main)
