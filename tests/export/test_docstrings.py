"""The runnable examples in the export modules' docstrings."""

import doctest

import pytest

from tf_blocksparse.export import saved_model
from tf_blocksparse.export import tflite


@pytest.mark.parametrize("module", [saved_model, tflite])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0
