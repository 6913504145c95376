"""The fine-tuning stage: LoRA SFT on a chat dataset with adapter checkpoints every N steps.

Its checkpoints are what the offline trajectory replays transcripts through; other stages
name them as ``{stage: finetune, checkpoint: final | <step>}``. The final adapter is
registered as ``lora-adapter-<name>``.
"""

from __future__ import annotations

from persona_ops.data import load_chat_dataset
from persona_ops.pipelines.stage import Pipeline, Register, stage


@stage("finetune", pipeline="finetune", params=["finetune.model", "finetune.train"],
       inputs={"dataset": "{finetune.dataset}"}, outputs={"adapter": "outputs/finetune/{finetune.name}"},
       registers=(Register("adapter", "lora-adapter-{finetune.name}", "lora-adapter"),),
       adapter_output="adapter")
def finetune(cfg, io) -> dict:
    """Train the adapter: ``checkpoint-<step>/`` directories, ``log.jsonl`` and ``manifest.json``."""
    from persona_ops.training.sft import train_lora

    ft = cfg.finetune
    examples = load_chat_dataset(io.input("dataset"))
    loaded = io.plain_model(ft.model)
    result = train_lora(loaded, [ex.messages for ex in examples], ft.train, io.output("adapter"), overwrite=True)
    losses = result.losses
    return {"examples": result.num_examples, "dropped": result.num_dropped, "steps": len(losses),
            "first_loss": losses[0] if losses else float("nan"), "final_loss": losses[-1] if losses else float("nan"),
            "steps_per_second": result.steps_per_second, "checkpoints": len(result.checkpoints)}


@finetune.validator
def _dataset(cfg, io) -> None:
    from persona_ops.errors import InputError

    if cfg.finetune.model.adapter:
        raise InputError("finetune.model.adapter: training starts from a base model; set it to null")
    load_chat_dataset(io.input("dataset"))


PIPELINE = Pipeline("finetune", (finetune,), "A LoRA fine-tune with adapter checkpoints (TRL + PEFT).")
