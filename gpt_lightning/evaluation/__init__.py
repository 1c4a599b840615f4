"""Task scores in plain PyTorch: what a model can do, not only its loss (docs/evaluation.md).

- `tasks`: the items of a task and how they are read from JSONL (multiple choice, generation) or text files;
- `builtin`: the built-in tasks, made from the corpus's held-out split;
- `scoring`: one result per item (or window) from a model, for any split of the items across processes;
- `metrics`: those results aggregated once: value, standard error, item count and chance level;
- `run`: `evaluate`, which scores a model on tasks, prints a table and writes a JSON record.
"""

from gpt_lightning.evaluation.builtin import BUILTIN_TASKS, builtin_task, held_out_text
from gpt_lightning.evaluation.metrics import Metric, choice_metrics, generation_metrics, text_metrics
from gpt_lightning.evaluation.run import evaluate, resolve_task, score_task
from gpt_lightning.evaluation.scoring import (
    ChoiceScore,
    GenerationScore,
    Window,
    WindowScore,
    normalize_answer,
    score_choices,
    score_generations,
    score_text,
    score_windows,
    text_windows,
)
from gpt_lightning.evaluation.tasks import (
    ChoiceItem,
    GenerationItem,
    GenerationTask,
    MultipleChoiceTask,
    Task,
    TaskFormatError,
    TextTask,
    read_task,
)

__all__ = [
    "BUILTIN_TASKS",
    "ChoiceItem",
    "ChoiceScore",
    "GenerationItem",
    "GenerationScore",
    "GenerationTask",
    "Metric",
    "MultipleChoiceTask",
    "Task",
    "TaskFormatError",
    "TextTask",
    "Window",
    "WindowScore",
    "builtin_task",
    "choice_metrics",
    "evaluate",
    "generation_metrics",
    "held_out_text",
    "normalize_answer",
    "read_task",
    "resolve_task",
    "score_choices",
    "score_generations",
    "score_task",
    "score_text",
    "score_windows",
    "text_metrics",
    "text_windows",
]
