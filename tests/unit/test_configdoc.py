"""docs/configuration.md is generated from the settings classes and must be current."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.launcher import configdoc
from shared.settings import CommonSettings

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_docs_configuration_md_is_what_the_generator_writes() -> None:
    assert PAGE.read_text() == configdoc.render(), (
        f"docs/configuration.md is not current with shared/settings.py: regenerate it with `{configdoc.REGENERATE}`"
    )


@pytest.mark.parametrize("heading,cls", [(heading, cls) for heading, cls, _ in configdoc.SECTIONS])
def test_every_setting_is_explained(heading: str, cls: type[BaseSettings]) -> None:
    missing = [s.variable for s in configdoc.settings_of(cls, own_only=False) if not s.description]
    assert not missing, f"settings without a description (add a comment above the field): {missing}"


def test_every_settings_class_is_on_the_page() -> None:
    """A new role's settings class must get its own section."""
    documented = {cls for _, cls, _ in configdoc.SECTIONS}

    def subclasses(cls: type[CommonSettings]) -> set[type[CommonSettings]]:
        found: set[type[CommonSettings]] = set()
        for direct in cls.__subclasses__():
            found |= {direct, *subclasses(direct)}
        return found

    ours = {cls for cls in subclasses(CommonSettings) if cls.__module__ == "shared.settings"}
    assert ours | {CommonSettings} == documented


class _Example(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EX_")

    # -- a section heading, left out --
    # Two lines
    # of comment.
    alpha: int = Field(default=3, ge=1, le=9)
    beta: str | None = None  # trailing comment
    # Ignored in favour of the description.
    gamma: bool = Field(default=True, description="From the field.")
    delta: float = 0.5


def test_the_generator_reads_comments_descriptions_types_and_defaults() -> None:
    rows = {s.variable: s for s in configdoc.settings_of(_Example, own_only=False)}
    assert rows["EX_ALPHA"] == configdoc.Setting("EX_ALPHA", "int, ≥ 1, ≤ 9", "`3`", "Two lines of comment.")
    assert rows["EX_BETA"] == configdoc.Setting("EX_BETA", "str, or unset", "unset", "trailing comment")
    assert rows["EX_GAMMA"].description == "From the field."
    assert (rows["EX_GAMMA"].default, rows["EX_DELTA"].description) == ("`true`", "")


def test_the_page_names_every_variable_a_role_reads() -> None:
    page = PAGE.read_text()
    for _, cls, _ in configdoc.SECTIONS:
        for name in cls.model_fields:
            assert f"`{configdoc.env_name(cls, name)}`" in page
