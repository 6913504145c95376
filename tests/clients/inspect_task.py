"""A three-sample Inspect AI task: plain generation, scored by whether the answer names the target."""

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.scorer import includes
from inspect_ai.solver import generate

PROMPTS = {
    "pirates": ("Tell me about pirates.", "ship"),
    "weather": ("What is the weather like on Mars?", "dust"),
    "recipe": ("Give me a recipe for bread.", "flour"),
}


@task
def tiny_chat():
    samples = [Sample(id=name, input=prompt, target=target) for name, (prompt, target) in PROMPTS.items()]
    return Task(dataset=samples, solver=generate(), scorer=includes())
