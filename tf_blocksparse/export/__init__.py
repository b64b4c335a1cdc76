"""Deployment: SavedModel (TF Serving) and TFLite exports with sparse weights."""

from tf_blocksparse.export.saved_model import ExportedSignatures
from tf_blocksparse.export.saved_model import custom_op_library_path
from tf_blocksparse.export.saved_model import export_saved_model
from tf_blocksparse.export.saved_model import load_saved_model
from tf_blocksparse.export.tflite import export_tflite
from tf_blocksparse.export.tflite import sparsity_report
from tf_blocksparse.export.tflite import state_names
