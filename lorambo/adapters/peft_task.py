"""The peft ``task_type`` of a transformers model, for the adapter config :func:`export_peft` writes.

``AutoPeftModelFor<Task>.from_pretrained(folder)`` builds the base model with the matching
transformers auto class (``AutoModelForCausalLM`` for ``CAUSAL_LM``, ...) from the config's
``base_model_name_or_path``, and refuses a config whose ``task_type`` is null. A task is named
only when exactly one of those auto classes builds this very class for the model's
``config.model_type``; anything else (a custom module, a subclass, a class two auto classes
build) keeps ``None``, which ``PeftModel.from_pretrained`` loads as before.
"""
from __future__ import annotations

from torch import nn

# peft's TaskType -> the transformers auto mapping its AutoPeftModelFor* class loads the base with
_AUTO_MAPPINGS = {
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "FEATURE_EXTRACTION": "MODEL_MAPPING_NAMES",
}


# the heads peft's PeftModelFor<Task> adds to modules_to_save (matched by the end of the name)
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def peft_task_type(model: nn.Module) -> str | None:
    """``"CAUSAL_LM"``, ``"SEQ_CLS"``, ... for a transformers model whose class one auto class
    builds; ``None`` when no single task fits."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return None
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:
        return None
    name = type(model).__name__
    tasks = []
    for task, mapping in _AUTO_MAPPINGS.items():
        built = getattr(modeling_auto, mapping, {}).get(model_type)
        if name in ((built,) if isinstance(built, str) else tuple(built or ())):
            tasks.append(task)
    if len(tasks) != 1 or not _is_transformers_class(type(model), name):
        return None
    return tasks[0]


def _is_transformers_class(cls: type, name: str) -> bool:
    """The class is transformers' own of that name, not a user class that shares it."""
    import transformers

    try:
        return getattr(transformers, name) is cls
    except AttributeError:
        return False
