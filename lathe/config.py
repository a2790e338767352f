"""The shared floor of params: reading params.yaml and validating one section against its model.

Each section's pydantic model lives beside the code that reads it (lathe.data.contract, lathe.<package>.params),
so a stage depends on its own section's code only: editing the package stage's params does not retrain the
teacher. Every model forbids extra keys, so a typo fails at once with the key's name, and a section a stage
asks for but params.yaml lacks (often a misspelt name) is an error with a did-you-mean, never silent defaults.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, Tag, ValidationError

from lathe.errors import ConfigError

# numpy's and torch's generators take 0 <= seed < 2**32 (torch more, numpy's legacy one less)
Seed = Field(0, ge=0, le=2**32 - 1, description="random seed, 0 to 2**32 - 1")


class Section(BaseModel):
    """Base for params sections: unknown keys are errors, values are immutable."""

    # NaN and inf (YAML .nan, .inf, or 1.0e400, which overflows to inf) are never a setting
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


S = TypeVar("S", bound=Section)


def load_params(path: Path) -> dict:
    """Read params.yaml; the message names the file on a YAML error."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: params file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def did_you_mean(word: object, choices: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
    hint = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def parse_section(params: dict, name: str, model: type[S], source: str = "params.yaml") -> S:
    """Validate `params[name]` against `model`; errors name the section, key and expectation.

    A section that is absent is an error (an empty one, `name:` alone, takes the model's defaults).
    """
    if name not in params:
        raise ConfigError(f"{source}: no section '{name}'{did_you_mean(name, list(params))}; "
                          f"sections present: {', '.join(map(str, params)) or 'none'}")
    raw = params[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join((name, *error_path(model, err["loc"])[0]))
            got = f" (got {err['input']!r})" if err["type"] not in ("missing", "union_tag_invalid") and "input" in err else ""
            msg = tag_message(err) or err["msg"]
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(sorted(_field_names(model, err["loc"][:-1])))
                msg = f"unknown key; allowed keys here: {allowed}"
                got = ""
            lines.append(f"  {key}: {msg}{got}")
        raise ConfigError(f"{source}: invalid section '{name}':\n" + "\n".join(lines)) from None


def _tagged_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """tag -> model of a tagged union (`Annotated[A, Tag("a")] | ...`); empty for any other annotation."""
    members = {}
    for arg in get_args(annotation):
        base, *meta = get_args(arg) or (arg,)
        for tag in (m for m in meta if isinstance(m, Tag)):
            if isinstance(base, type) and issubclass(base, BaseModel):
                members[tag.tag] = base
    return members


def error_path(model: type[BaseModel], loc: tuple) -> tuple[tuple[str, ...], type[BaseModel]]:
    """A validation error's location as a params key path (without the tags pydantic puts in it for a tagged
    union: `arch.resnet_like.widht` is the user's `arch.widht`) and the model its last key lives in."""
    current, path, parts, i = model, [], [str(p) for p in loc], 0
    while i < len(parts):
        path.append(parts[i])
        ann = getattr(current.model_fields.get(parts[i]), "annotation", None)
        members = _tagged_members(ann)
        if i + 1 < len(parts) and parts[i + 1] in members:
            current, i = members[parts[i + 1]], i + 2
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            current, i = ann, i + 1
        else:  # a list index, a dict key or a plain value: the rest of the path is not in models
            return (*path, *parts[i + 1 :]), current
    return tuple(path), current


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The allowed keys of the (possibly nested) model at `loc`."""
    return list(error_path(model, loc)[1].model_fields)


def tag_message(err: Any) -> str | None:
    """A tagged union's refusal of its tag, in params words ("family 'vgg' is not one of ..."); None otherwise."""
    if err["type"] != "union_tag_invalid":
        return None
    ctx = err.get("ctx") or {}
    what = str(ctx.get("discriminator", "tag")).removesuffix("()").removesuffix("_of")
    return f"{what} {ctx.get('tag')!r} is not one of {str(ctx.get('expected_tags', '')).replace(chr(39), '')}"


def load_section(path: Path, name: str, model: type[S]) -> S:
    """Load one validated section of a params file."""
    return parse_section(load_params(path), name, model, source=str(path))


