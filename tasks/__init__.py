"""Task families, one module each; installed as ``finetune.tasks``.

Each module defines a ``Task`` subclass and its table of presets. Families are imported lazily so
that a GLUE run does not import the generation stack.
"""

from __future__ import annotations

from importlib import import_module

from finetune.errors import FinetuneError

#: family name -> "module:class" inside this package
FAMILIES: dict[str, str] = {
    "glue": "glue:GlueTask",
    "summarization": "summarization:SummarizationTask",
    "translation": "translation:TranslationTask",
}


def task_class(family: str) -> type:
    """The Task subclass of a family, with a one-line error for unknown names."""
    if family not in FAMILIES:
        # The same words as finetune.validation's rule for --task: config derivation asks for the class first.
        raise FinetuneError(f"--task {family}: must be one of {', '.join(FAMILIES)}")
    module_name, class_name = FAMILIES[family].split(":")
    try:
        module = import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as error:
        if error.name == f"{__name__}.{module_name}":
            raise FinetuneError(f"task family '{family}' is not available in this version") from None
        raise
    return getattr(module, class_name)
