"""The persona-space pipeline (Lu et al. 2026, "The Assistant Axis") and checkpoint trajectories.

Per role: ``role_transcripts`` -> ``role_judge`` -> ``role_activations``; then ``persona_space``
(role vectors, PCA, the axis) and ``capping``. The ``trajectory`` pipeline replays the same
transcripts through every checkpoint (``checkpoint_activations``) and places each in the space.
Files live under ``outputs/persona_space/``; layers are ``hidden_states`` indices (0 = embeddings).
The ``default`` role is always included: the axis needs it.
"""

from persona_ops.pipelines.persona_space.activations import checkpoint_activations, role_activations
from persona_ops.pipelines.persona_space.judging import role_judge
from persona_ops.pipelines.persona_space.space import capping, persona_space
from persona_ops.pipelines.persona_space.trajectory import trajectory
from persona_ops.pipelines.persona_space.transcripts import role_transcripts
from persona_ops.pipelines.stage import Pipeline

PIPELINE = Pipeline("persona-space", (role_transcripts, role_judge, role_activations, persona_space, capping),
                    "Persona space and the Assistant Axis from the reference model's role transcripts.")
TRAJECTORY = Pipeline("trajectory", (checkpoint_activations, trajectory),
                      "The persona space, then every checkpoint's activations on the same transcripts "
                      "and the trajectory report.")
