"""The form a model is exported in: its pruned weights block sparse.

An export of a pruned model (wrapped, or stripped with its zeros in place)
should store and run the weights block sparse without the user converting it
first. `block_sparse_form` converts it here, with `to_block_sparse`'s rule
(a weight with at least `min_sparsity` zeros, in whole blocks), and says what
it did; a model with nothing to convert is exported as given, with a note
unless it already holds tf_blocksparse layers.
"""

import warnings

from tf_blocksparse import conversion

CHOICES = ("auto", False)


def _has_block_sparse_layers(model):
  return any(type(m).__module__.startswith("tf_blocksparse.layers")
             for m in model.submodules)


def block_sparse_form(model, block_sparse="auto", min_sparsity=0.5,
                      caller="export"):
  """`(model to export, report)`.

  `report`: `{"converted": names of the layers converted here, "note": why
  the model is exported as given, or None}`. With `block_sparse=False` the
  model is exported as given, silently. Otherwise a model with neither
  convertible weights nor tf_blocksparse layers gets a warning (it is
  exported dense).
  """
  if block_sparse not in CHOICES:
    raise ValueError(f"block_sparse must be 'auto' or False, got {block_sparse!r}")
  if block_sparse is False:
    return model, {"converted": [], "note": "block_sparse=False: exported as given"}
  try:  # min_sparsity is checked there, with to_block_sparse's message
    converted, names = conversion.convert_with_report(model, min_sparsity)
  except TypeError as e:  # a subclassed model cannot be rebuilt
    note = f"not converted: {e}"
  else:
    if names:
      return converted, {"converted": names, "note": None}
    if _has_block_sparse_layers(model):
      return model, {"converted": [], "note": None}
    note = ("no weight has block-structured zeros at min_sparsity "
            f"{min_sparsity}: exported dense")
  if not _has_block_sparse_layers(model):
    warnings.warn(f"{caller}: model {model.name}: {note} (pass "
                  "block_sparse=False to export a dense model on purpose)",
                  stacklevel=3)
  return model, {"converted": [], "note": note}
