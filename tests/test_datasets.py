"""Datasets beyond the bundled two: any tfds image dataset, users' arrays, models shaped by the
data, and the run's hparams. Offline: the synthetic tfds datasets are generated in the test."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import ntkdfl_tf as nd
from ntkdfl_tf import experiment

SHAPE, CLASSES = (12, 12, 3), 3


def _images(split, n):
    rng = np.random.default_rng({"train": 0, "test": 1}[split])
    return rng.integers(0, 256, (n,) + SHAPE, dtype=np.uint8), rng.integers(0, CLASSES, n)


class TinyRgbForTests(tfds.core.GeneratorBasedBuilder):
    """12 x 12 RGB images of 3 classes: 60 for training, 30 for testing, no download."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=SHAPE),
            "label": tfds.features.ClassLabel(num_classes=CLASSES)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", 60),
                "test": self._generate_examples("test", 30)}

    def _generate_examples(self, split, n):
        x, y = _images(split, n)
        for i in range(n):
            yield i, {"image": x[i], "label": int(y[i])}


class TinyTextForTests(tfds.core.GeneratorBasedBuilder):
    """A dataset without images: nd.data.load must refuse it by name."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
        raise AssertionError("never prepared: the features are refused first")

    def _generate_examples(self):
        yield 0, {}


@pytest.mark.parametrize("name", nd.data.DATASETS)
def test_bundled_datasets_load_offline_and_shape_their_models(name):
    """Fashion-MNIST and MNIST from NTKDFL_DATA_DIR; for_data reads shape and classes."""
    (x, y), (x_test, y_test) = nd.data.load(name)
    assert x.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x.dtype == np.uint8 and y.dtype == np.int64 and set(np.unique(y_test)) == set(range(10))
    model = nd.models.for_data(x, y)()
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    mean, std = nd.data.STATS[name]  # the computed standardisation matches the bundled constants
    standardised = model.layers[0](x[:2000].astype(np.float32)).numpy()
    assert abs(standardised.mean()) < 0.05 and abs(standardised.std() - 1) < 0.05
    assert abs(x.mean() / 255 - mean) < 1e-3 and abs(x.std() / 255 - std) < 1e-3


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_any_tfds_image_dataset_loads(tiny_tfds):
    (x, y), (x_test, y_test) = nd.data.load("tiny_rgb_for_tests", tfds_data_dir=tiny_tfds)
    assert x.shape == (60,) + SHAPE and x_test.shape == (30,) + SHAPE
    assert x.dtype == np.uint8 and y.dtype == np.int64
    expected_x, expected_y = _images("train", 60)  # tfds may reorder the examples
    assert sorted(map(bytes, x)) == sorted(map(bytes, expected_x))
    assert np.bincount(y, minlength=CLASSES).tolist() == np.bincount(expected_y,
                                                                     minlength=CLASSES).tolist()


def test_a_run_on_a_tfds_dataset_shapes_its_model_and_writes_hparams(tiny_tfds, tmp_path):
    """Config(dataset=<any tfds name>) passes validation; the saved model takes 12x12x3
    images and gives 3 logits; the logdir holds the run's configuration as hparams."""
    import keras
    from tensorboard.plugins.hparams import plugin_data_pb2

    dataset = nd.data.load("tiny_rgb_for_tests", tfds_data_dir=tiny_tfds)
    cfg = experiment.Config(dataset="tiny_rgb_for_tests", model="cnn", num_clients=4,
                            samples_per_client=10, num_neighbors=2, rounds=1, taus=(5,),
                            verbose=0, logdir=str(tmp_path / "run"), save_dir=str(tmp_path))
    trainer, history = experiment.run(cfg, dataset=dataset)
    assert 0 <= history.history["val_accuracy"][0] <= 1
    model = keras.models.load_model(tmp_path / "run.keras")
    assert model.input_shape == (None,) + SHAPE and model.output_shape == (None, CLASSES)
    found = {}
    for path in glob.glob(str(tmp_path / "run" / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content)
                    found = dict(data.session_start_info.hparams)
    assert found["dataset"].string_value == "tiny_rgb_for_tests"
    assert found["num_clients"].number_value == 4 and found["taus"].string_value == "5"
    assert "logdir" not in found


def test_unknown_name_is_one_clear_line(one_line_error):
    message = one_line_error(nd.data.load, "no_such_dataset", names=("'no_such_dataset'",
                                                                      "from_arrays"))
    assert one_line_error(experiment.validate, experiment.Config(dataset="no_such_dataset"),
                          names=("'no_such_dataset'",)) == message


def test_unusable_features_name_what_was_found(one_line_error):
    one_line_error(nd.data.load, "tiny_text_for_tests",
                   names=("'tiny_text_for_tests'", "text: Text", "label: ClassLabel", "'image'"))


def test_from_arrays_adds_a_channel_and_splits_off_a_test_set():
    x = np.arange(50 * 6 * 5, dtype=np.uint8).reshape(50, 6, 5)
    y = np.arange(50) % 4
    (x_train, y_train), (x_test, y_test) = nd.data.from_arrays(x, y.astype(np.float32))
    assert x_train.shape == (40, 6, 5, 1) and x_test.shape == (10, 6, 5, 1)
    assert y_train.dtype == np.int64
    merged = np.concatenate([y_train, y_test])
    assert sorted(merged.tolist()) == sorted(y.tolist())  # a split, nothing lost or repeated
    again = nd.data.from_arrays(x, y)
    np.testing.assert_array_equal(again[1][1], y_test)  # seeded
    model = nd.models.for_data(x_train, y_train, hidden=(7,))()
    assert model.input_shape == (None, 6, 5, 1) and model.output_shape == (None, 4)


@pytest.mark.parametrize("args, names", [
    ((np.zeros((5, 4, 4)), np.zeros(4)), ("(5, 4, 4)", "(4,)")),
    ((np.zeros((5, 4, 4)), np.eye(5)), ("argmax", "(5, 5)")),
    ((np.full((5, 4, 4), np.nan), np.zeros(5)), ("NaN",)),
    ((np.zeros((5, 4, 4)), np.zeros(5), np.zeros((2, 3, 3)), np.zeros(2)), ("(3, 3, 1)",
                                                                           "(4, 4, 1)")),
    ((np.zeros((5, 4, 4)), np.zeros(5) - 1), ("-1",)),
])
def test_from_arrays_errors_name_the_value(one_line_error, args, names):
    one_line_error(nd.data.from_arrays, *args, names=names)
