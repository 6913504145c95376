"""Stage ``role_judge``: the 0-3 role-expression score of every transcript of one role."""

from __future__ import annotations

from persona_ops.data import load_role
from persona_ops.io import read_jsonl, write_jsonl
from persona_ops.judge import fill_template, make_judge
from persona_ops.pipelines.persona_space.roles import KEY_FIELDS, OUT, role_files
from persona_ops.pipelines.persona_space.transcripts import ROLE_FILE
from persona_ops.pipelines.stage import Output, stage

SCORES = OUT + "/scores/{item}.scores.jsonl"


def most_likely(score, probs: dict[int, float]) -> int | None:
    """The most likely integer answer (ties go to the lower one); None when the score is None."""
    if score is None or not probs:
        return None
    return max(sorted(probs), key=lambda k: probs[k])


@stage("role_judge", pipeline="persona-space", each="persona_space.roles.names", each_default=role_files,
       params=["persona_space.judge"],
       inputs={"transcripts": Output("role_transcripts", "transcripts"), "role": ROLE_FILE},
       outputs={"scores": SCORES})
def role_judge(cfg, io) -> dict:
    """One ``{index, system_prompt_idx, question_idx, rollout_idx, score, label, probs}`` per transcript
    record (``score``: the expected value, ``label``: the most likely integer) with the role's
    ``eval_prompt``. The default role is not judged (its vector uses every sample): its file is
    empty and no judge is loaded."""
    role = load_role(io.input("role"))
    records = [] if role.is_default else read_jsonl(io.input("transcripts"))
    judge = make_judge(cfg.persona_space.judge, io.root, load=io.model) if records else None
    if judge:
        io.made_with(judge.label)
    prompts = [fill_template(role.eval_prompt, r["question"], r["response"]) for r in records]
    details = judge.score_details(prompts, lo=0, hi=3) if prompts else []
    rows = []
    for i, (rec, det) in enumerate(zip(records, details)):
        rows.append({"index": i, **{k: rec[k] for k in KEY_FIELDS}, "score": det.score,
                     "label": most_likely(det.score, det.probs),
                     "probs": {str(k): v for k, v in sorted(det.probs.items())}})
    write_jsonl(io.output("scores"), rows)
    metrics = {"judged": len(rows), "unscored": sum(r["score"] is None for r in rows),
               "judge_backend_calls": judge.backend_calls if judge else 0}
    if rows:
        scored = [r["score"] for r in rows if r["score"] is not None]
        metrics.update(label3_fraction=sum(r["label"] == 3 for r in rows) / len(rows),
                       mean_score=sum(scored) / len(scored) if scored else float("nan"))
    return metrics


@role_judge.validator
def _role(cfg, io) -> None:
    load_role(io.input("role"))
