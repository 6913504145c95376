"""MLflow, through this package only: the store, runs, the registry and lineage graphs.

Every stage execution is a run in the running pipeline's experiment, nested under the
pipeline's run; each holds its provenance record (``provenance.json``), its declared params,
metrics, the model label and the DVC md5s of its outputs. Outputs a stage declares as
registered become versions of a named model of a kind (``persona-vector``, ...).
"""
