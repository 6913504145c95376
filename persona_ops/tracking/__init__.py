"""MLflow, through this package only: the store, runs, the registry and lineage graphs.

Every stage execution is a run in the running pipeline's experiment, nested under the
pipeline's run; each holds its provenance record (``provenance.json``), its declared params,
metrics, the model label and the DVC md5s of its outputs. Outputs a stage declares as
registered become versions of a named model of a kind (``persona-vector``, ...).

Tracking never decides whether a stage succeeds: what MLflow does not take (the server is down,
or dies mid-stage) waits in the project's outbox (``outbox``) and is replayed once, by
``persona-ops track sync`` or the next run (``sync``), which also ends runs left RUNNING by
processes that died.
"""
