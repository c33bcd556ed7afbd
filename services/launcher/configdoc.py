"""``python -m services.launcher.configdoc > docs/configuration.md``: every setting, per role.

The page is generated from the pydantic-settings classes in shared/settings.py, so it cannot
drift from the code (tests/unit/test_configdoc.py fails when the committed page is stale). A
setting's explanation is its ``Field(description=...)`` when it has one, else the comment
lines right above its declaration plus a comment at the end of that line.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import sys
import textwrap
import tokenize
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from shared.settings import (
    CommonSettings,
    DetokenizerSettings,
    EngineSettings,
    GatewaySettings,
    LauncherSettings,
    TokenizerSettings,
)

REGENERATE = "python -m services.launcher.configdoc > docs/configuration.md"

# (heading, the class, what it is for), in the page's order. The roles' sections list only
# what their class adds to CommonSettings.
SECTIONS: tuple[tuple[str, type[BaseSettings], str], ...] = (
    ("Every role", CommonSettings, "Read by every process: where Redis is, the streams, the model, heartbeats."),
    ("gateway", GatewaySettings, "`scalellm gateway`: HTTP, admission control, per-request limits."),
    ("tokenizer", TokenizerSettings, "`scalellm tokenizer`."),
    ("engine", EngineSettings, "`scalellm engine`: the backend, batching, the KV cache, kernels."),
    ("detokenizer", DetokenizerSettings, "`scalellm detokenizer`."),
    ("scalellm up", LauncherSettings, "The local launcher, which passes the environment on to the services it starts."),
)

_CONSTRAINTS: tuple[tuple[type[Any], str, str], ...] = (
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.Lt, "lt", "<"),
)


@dataclass(frozen=True, slots=True)
class Setting:
    variable: str
    type: str
    default: str
    description: str


def env_name(cls: type[BaseSettings], name: str) -> str:
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def settings_of(cls: type[BaseSettings], *, own_only: bool) -> list[Setting]:
    """The settings of ``cls`` in declaration order; ``own_only``: those CommonSettings lacks."""
    names = [n for n in cls.model_fields if not (own_only and n in CommonSettings.model_fields)]
    return [_setting(cls, name, cls.model_fields[name]) for name in names]


def render() -> str:
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from shared/settings.py: do not edit by hand. Regenerate with",
        f"     {REGENERATE} -->",
        "",
        "Every setting is an environment variable with the prefix `SCALELLM_` (upper case; pydantic-settings",
        "also accepts lower case). A bad value stops start-up with a line naming the variable. A role",
        "ignores variables it does not read, so one set of variables (a `.env` file, a ConfigMap) can",
        "serve every role. The container image sets `SCALELLM_MODEL_CACHE_DIR=/cache/models` and",
        "`SCALELLM_KERNEL_CACHE_DIR=/cache/kernels` (Dockerfile).",
        "",
    ]
    for heading, cls, intro in SECTIONS:
        lines += [f"## {heading}", "", f"{intro} (`{cls.__name__}`)", ""]
        lines += ["| variable | type | default | what it does |", "|---|---|---|---|"]
        for s in settings_of(cls, own_only=cls is not CommonSettings):
            lines.append(f"| `{s.variable}` | {_cell(s.type)} | {_cell(s.default)} | {_cell(s.description)} |")
        lines.append("")
    return "\n".join(lines)


def _setting(cls: type[BaseSettings], name: str, field: FieldInfo) -> Setting:
    description = field.description or _comment_of(_declaring_class(cls, name), name)
    return Setting(env_name(cls, name), _type_text(field.annotation, field.metadata), _default_text(field), description)


def _declaring_class(cls: type[BaseSettings], name: str) -> type[BaseSettings]:
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            return klass
    return cls


def _comment_of(cls: type[BaseSettings], name: str) -> str:
    return _class_comments(cls).get(name, "")


@functools.cache
def _class_comments(cls: type[BaseSettings]) -> dict[str, str]:
    """Field name -> the comment block above its declaration, then its end-of-line comment."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line (1-based, in ``source``) -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    rows = source.splitlines()
    found: dict[str, str] = {}
    (klass,) = ast.parse(source).body
    if not isinstance(klass, ast.ClassDef):
        raise TypeError(f"{cls.__qualname__}: its source is not a class")
    for node in klass.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and rows[line - 1].lstrip().startswith("#"):
            text = comments[line]
            if not (text.startswith("--") and text.endswith("--")):  # a section heading, not about this field
                above.insert(0, text)
            line -= 1
        end = node.end_lineno or node.lineno
        trailing = comments.get(end) if not rows[end - 1].lstrip().startswith("#") else None
        found[node.target.id] = " ".join(above + ([trailing] if trailing else []))
    return found


def _type_text(annotation: Any, metadata: list[Any]) -> str:
    if get_origin(annotation) is Annotated:
        base, *extra = get_args(annotation)
        return _type_text(base, [*extra, *metadata])
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        text = " or ".join(_type_text(option, metadata) for option in options)
        return f"{text}, or unset" if len(options) < len(get_args(annotation)) else text
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{_value(choice)}`" for choice in get_args(annotation))
    base = "secret string" if annotation is SecretStr else getattr(annotation, "__name__", str(annotation))
    return ", ".join([base, *_constraint_texts(metadata)])


def _constraint_texts(metadata: list[Any]) -> list[str]:
    texts = []
    for item in metadata:
        for kind, attribute, sign in _CONSTRAINTS:
            if isinstance(item, kind):
                texts.append(f"{sign} {getattr(item, attribute)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length > 0:
            texts.append("not empty")
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            texts.append(f"matching `{pattern}`")
    return texts


def _default_text(field: FieldInfo) -> str:
    if field.default is None:
        return "unset"
    return f"`{_value(field.default)}`"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _cell(text: str) -> str:
    """Markdown table cell: a literal ``|`` would end the cell."""
    return text.replace("|", "\\|")


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
