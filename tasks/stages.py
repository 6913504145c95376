"""The Prefect task of every stage item: the runner, with retries for transient failures only.

A task runs one stage item DVC does not have up to date, in the flow's process (models stay
loaded across items: the run's model pool); the runner commits what ran to DVC, so DVC stays
the one cache. Task runs are named by what they work on (``generate[evil]``), time
out after the stage's ``timeout_s`` and retry only ``TransientError`` (rate limits, a busy DVC
lock): bad input and bugs fail at once.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from persona_ops.errors import TransientError
from persona_ops.pipelines import runner
from persona_ops.pipelines.registry import Task


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: only transient errors are worth another attempt."""
    try:
        state.result()
    except TransientError:
        return True
    except BaseException:
        return False
    return False


@task(name="check-inputs", cache_policy=NO_CACHE, retries=0)
def check_inputs(tasks: list[Task], ctx: runner.Context) -> int:
    """Every input exists or is made earlier, every model reference resolves; before any model loads."""
    runner.check(tasks, ctx)
    return len(tasks)


@task(name="stage", cache_policy=NO_CACHE)
def run_stage(item: Task, ctx: runner.Context) -> runner.Outcome:
    """Run one stage item: its metrics, MLflow run and provenance; holding a slot of
    ``orchestration.concurrency_limit`` when one is named."""
    limit = ctx.params.orchestration.concurrency_limit
    if limit is None:
        return runner.execute(item, ctx)
    from prefect.concurrency.sync import concurrency

    with concurrency(limit, occupy=1, strict=True):
        return runner.execute(item, ctx)


def stage_task(item: Task, ctx: runner.Context):
    """``run_stage`` named for ``item``, with its timeout and the run's retry settings."""
    o = ctx.params.orchestration
    return run_stage.with_options(task_run_name=item.label, timeout_seconds=item.stage.timeout_s,
                                  retries=o.retries, retry_delay_seconds=o.retry_delay_s,
                                  retry_condition_fn=retry_transient)
