"""Load image-classification datasets through tensorflow-datasets as NumPy arrays.

Any tfds dataset with an ``image`` feature (uint8 images of one fixed size, any channel count)
and a ``label`` feature (``ClassLabel``) and ``train`` and ``test`` splits loads by name
(``kmnist``, ``cifar10``, ...): from tfds's prepared copy, or downloaded once when online. The two
bundled ones, Fashion-MNIST and MNIST, also load offline from their original IDX files.

Where the original IDX ``.gz`` files are looked for, in order:

1. the ``data_dir`` argument (the launchers' ``--data_dir`` flag);
2. the ``NTKDFL_DATA_DIR`` environment variable;
3. ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``; Fashion-MNIST only).

A folder qualifies if it holds the four files itself or in a sub-folder named after the dataset
(``<dir>/fashion_mnist``). Files whose SHA-256 equals the upstream one are handed to tfds as its
``manual_dir``. Files with rewritten gzip headers (Debian's) fail that checksum although their pixels
are the same, so their *decompressed* content is checked instead and parsed directly. With no local
files, tfds is asked as usual (it reuses a prepared copy, or downloads when online).
"""

import gzip
import hashlib
import os
import tempfile

import numpy as np

DATASETS = ("fashion_mnist", "mnist")
ENV_VAR = "NTKDFL_DATA_DIR"
DEBIAN_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}

_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# SHA-256 of the upstream .gz files (as tfds registers them) and of their decompressed content.
_GZ_SHA256 = {
    "fashion_mnist": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                      "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                      "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                      "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    "mnist": ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
              "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
              "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
              "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
_IDX_SHA256 = {
    "fashion_mnist": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                      "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                      "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                      "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    "mnist": ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
              "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
              "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
              "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}


class DataNotFoundError(FileNotFoundError):
    """No usable copy of a dataset was found (and tfds could not fetch one)."""


class DataChecksumError(ValueError):
    """Local dataset files exist but their content does not match the upstream release."""


def candidate_dirs(name, data_dir=None):
    """Returns the folders searched for ``name``'s files, in search order."""
    roots = [d for d in (data_dir, os.environ.get(ENV_VAR), DEBIAN_DIRS.get(name)) if d]
    dirs = []
    for root in roots:
        dirs += [os.path.join(root, name), root]
    return dirs


def _find_files(name, data_dir):
    for folder in candidate_dirs(name, data_dir):
        paths = [os.path.join(folder, f + ".gz") for f in _FILES]
        if all(os.path.isfile(p) for p in paths):
            return folder, paths
    return None, None


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _parse_idx(raw):
    """Parses an IDX byte string (magic: 0 0 dtype ndim, then big-endian dims) of uint8 data."""
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataChecksumError("not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_idx_checked(name, folder, paths):
    """Reads gzip files whose headers differ from upstream, checking the decompressed content."""
    arrays = []
    for path, expected in zip(paths, _IDX_SHA256[name]):
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        except (OSError, EOFError) as e:
            raise DataChecksumError(
                f"{path} is not a readable gzip file ({e}); replace it with the original "
                f"{os.path.basename(path)} of {name}") from e
        if _sha256(raw) != expected:
            raise DataChecksumError(
                f"{path}: decompressed content does not match the upstream {name} release "
                f"(SHA-256 {_sha256(raw)}, expected {expected}); the file is corrupt or from "
                "another dataset. Replace it with the original file.")
        arrays.append(_parse_idx(raw))
    x_train, y_train, x_test, y_test = arrays
    return ((x_train[..., None], y_train.astype(np.int64)),
            (x_test[..., None], y_test.astype(np.int64)))


def _tfds_load(name, manual_dir=None, tfds_data_dir=None):
    import tensorflow_datasets as tfds  # imported lazily: heavy, and only needed here

    kwargs = {}
    # A private extraction folder: tfds names extracted files after the archive alone, and
    # MNIST's and Fashion-MNIST's share names, so a shared folder gave MNIST Fashion's pixels.
    with tempfile.TemporaryDirectory() as extract_dir:
        if manual_dir is not None:
            config = tfds.download.DownloadConfig(manual_dir=manual_dir, extract_dir=extract_dir)
            kwargs["download_and_prepare_kwargs"] = {"download_config": config}
        splits = tfds.load(name, split=["train", "test"], batch_size=-1,
                           data_dir=tfds_data_dir, **kwargs)
        (x_train, y_train), (x_test, y_test) = ((s["image"], s["label"])
                                                for s in tfds.as_numpy(splits))
    return (x_train, y_train.astype(np.int64)), (x_test, y_test.astype(np.int64))


def check_name(name):
    """Raises ValueError unless ``name`` is a bundled dataset or a tfds dataset (no download)."""
    if name in DATASETS:
        return
    _tfds_builder(name)


def _tfds_builder(name, tfds_data_dir=None):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=tfds_data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown dataset {name!r}: neither {' nor '.join(DATASETS)} nor a "
                         "tensorflow-datasets name; pick an image-classification dataset of "
                         "tfds (e.g. kmnist, cifar10) or pass your arrays to "
                         "nd.data.from_arrays.") from e


def check_features(name, features):
    """Raises ValueError unless tfds ``features`` have a fixed-size uint8 ``image`` and a
    ``ClassLabel`` ``label``; the message names what was found."""
    import tensorflow_datasets as tfds

    image = features["image"] if "image" in features else None
    label = features["label"] if "label" in features else None
    usable = (isinstance(image, tfds.features.Image) and image.np_dtype == np.uint8
              and None not in image.shape and isinstance(label, tfds.features.ClassLabel))
    if not usable:
        found = ", ".join(f"{k}: {type(v).__name__}{getattr(v, 'shape', '')} "
                          f"{getattr(v, 'np_dtype', '')}".strip() for k, v in features.items())
        raise ValueError(f"Dataset {name!r} has features {{{found}}}; nd.data.load needs 'image' "
                         "(uint8 Image of one fixed size) and 'label' (ClassLabel): load it "
                         "with tensorflow_datasets and pass the arrays to nd.data.from_arrays.")


def _load_tfds_images(name, tfds_data_dir):
    """Any tfds image-classification dataset (see the module docstring)."""
    builder = _tfds_builder(name, tfds_data_dir)
    check_features(name, builder.info.features)
    try:
        return _tfds_load(name, tfds_data_dir=tfds_data_dir)
    except ValueError as e:  # e.g. no 'test' split (tfds says what it has)
        raise ValueError(f"Could not load {name!r} (nd.data.load needs 'train' and 'test' "
                         f"splits): {str(e).splitlines()[0]}") from e
    except Exception as e:  # tfds raises many kinds when offline; all mean "not available"
        raise DataNotFoundError(
            f"tensorflow-datasets could not provide {name} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); prepare it once online "
            f"(tfds.load({name!r})) or pass tfds_data_dir= a folder holding its prepared copy."
        ) from e


def load(name="fashion_mnist", data_dir=None, tfds_data_dir=None):
    """Loads an image-classification dataset as NumPy arrays.

    Args:
        name: ``"fashion_mnist"`` or ``"mnist"`` (offline when their original files are found
            locally), or any tfds dataset with an ``image`` (uint8, one fixed size) and a
            ``label`` (``ClassLabel``) feature and ``train`` and ``test`` splits.
        data_dir: folder holding the original IDX ``.gz`` files (or a parent with a
            ``<name>/`` sub-folder). Searched before ``$NTKDFL_DATA_DIR`` and Debian's folder.
        tfds_data_dir: where tfds keeps its prepared copy (tfds's default when None).

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images uint8 of shape (n, height, width,
        channels) as tfds gives them, labels int64.

    Raises:
        ValueError: unknown dataset name, or a dataset without usable ``image`` and ``label``
            features or ``train`` and ``test`` splits; the message names what was found.
        DataChecksumError: local files whose content is not the upstream release.
        DataNotFoundError: no local files and tfds could not provide the dataset.
    """
    if name not in DATASETS:
        return _load_tfds_images(name, tfds_data_dir)
    folder, paths = _find_files(name, data_dir)
    if folder is not None:
        with_upstream_checksums = all(
            _sha256(open(p, "rb").read()) == h for p, h in zip(paths, _GZ_SHA256[name]))
        if with_upstream_checksums:
            return _tfds_load(name, manual_dir=folder, tfds_data_dir=tfds_data_dir)
        return _load_idx_checked(name, folder, paths)
    try:
        return _tfds_load(name, tfds_data_dir=tfds_data_dir)
    except Exception as e:  # tfds raises many kinds when offline; all mean "not available"
        looked = "\n  ".join(candidate_dirs(name, data_dir)) or "(no folder configured)"
        raise DataNotFoundError(
            f"Could not find the {name} files ({', '.join(f + '.gz' for f in _FILES)}).\n"
            f"Looked in:\n  {looked}\nand tensorflow-datasets could not provide it ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}).\nFix: pass data_dir=... (launchers: "
            f"--data_dir=...) or set {ENV_VAR} to a folder holding the original files"
            + (", or `apt-get install dataset-fashion-mnist`." if name in DEBIAN_DIRS else ".")
        ) from e
