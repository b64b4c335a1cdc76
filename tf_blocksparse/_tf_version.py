"""The TensorFlow series this package is built for, checked at import.

The op library is compiled against TensorFlow's C++ headers and links
`libtensorflow_framework.so.2`, whose ABI changes from one minor release to
the next, and tf_keras / tfmot are pinned to the same series. So a build
works with the TensorFlow series it was compiled against and no other:
`import tf_blocksparse` under another TensorFlow stops with an ImportError
that says which versions are involved and what to install, instead of
failing later on an undefined symbol or a Keras mismatch.

`setup.py` and `pyproject.toml` use the same series (setup.py reads
`TF_SERIES` from this file without importing the package, refuses to build
against another series, and tests/test_packaging.py checks that
pyproject.toml agrees).
"""

import re

TF_SERIES = "2.21"


def series_of(version):
  """`"2.21"` for `"2.21.0"`, `"2.21.0rc1"`, `"2.21.1-dev2025"`; None if unparsable.

  >>> series_of("2.21.0rc1"), series_of("2.3.1"), series_of("nightly")
  ('2.21', '2.3', None)
  """
  match = re.match(r"^(\d+)\.(\d+)(?:[.\-+a-z]|$)", str(version))
  return f"{match.group(1)}.{match.group(2)}" if match else None


def mismatch_message(version):
  """The error text for TensorFlow `version`, or None when it is supported."""
  if series_of(version) == TF_SERIES:
    return None
  return (f"tf_blocksparse needs TensorFlow {TF_SERIES}.x (its op library is "
          f"compiled against that release's C++ ABI, and tf_keras/tfmot are "
          f"pinned to it), but TensorFlow {version} is installed. Install the "
          f"matching release: `pip install \"tensorflow=={TF_SERIES}.*\" "
          f"\"tf_keras=={TF_SERIES}.*\"`, in a fresh virtualenv if other "
          f"packages need this TensorFlow.")


def check_installed():
  """Raises ImportError unless the importable TensorFlow is of `TF_SERIES`."""
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"tf_blocksparse needs TensorFlow {TF_SERIES}.x, which cannot be "
        f"imported ({e}). Install it: `pip install \"tensorflow=={TF_SERIES}.*\"` "
        "(installing tf_blocksparse with pip brings it).") from e
  message = mismatch_message(tf.__version__)
  if message:
    raise ImportError(message)
