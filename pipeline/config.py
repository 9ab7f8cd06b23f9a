"""Loading pydantic configs from YAML or JSON files, with errors a person can read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline.errors import InputError

M = TypeVar("M", bound=BaseModel)


class ConfigError(InputError):
    """A config file is missing, not YAML/JSON, or fails validation (every field error listed)."""


def format_validation_error(exc: ValidationError) -> str:
    """One line per field error: ``path.to.field: message``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def raise_problems(model: type[BaseModel] | BaseModel, problems: list[tuple[str, str]]) -> None:
    """Raises every cross-field problem of a model at once, each under its field, so a person fixes them in one go.

    Raised from a ``model_validator``, pydantic merges them with the other field errors of the same validation.

    Args:
        model: the model (class or instance) whose validator found the problems.
        problems: ``(field, message)`` pairs; nothing is raised when empty.
    """
    if not problems:
        return
    cls = model if isinstance(model, type) else type(model)
    details = [InitErrorDetails(type=PydanticCustomError("value_error", "{problem}", {"problem": msg}), loc=(field,),
                                input=getattr(model, field, None))
               for field, msg in problems]
    raise ValidationError.from_exception_data(cls.__name__, details)


def load_config(path: str | Path, model: type[M], **overrides) -> M:
    """Reads ``path`` (``.yaml``/``.yml``/``.json``) into ``model``; ``overrides`` win over the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid {model.__name__}:\n{format_validation_error(exc)}") from exc
