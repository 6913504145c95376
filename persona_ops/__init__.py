"""persona-ops: a platform for research on language-model personas.

The compute modules of this package import torch/transformers/numpy only, never
prefect, mlflow or dvc, so they run on a bare GPU box and in a notebook.
"""

__version__ = "0.1.0"
