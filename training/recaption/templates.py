"""Prompt templates: the Lens "dense" default plus "short" and "tags" presets, with per-image variables.

A template is a ``str.format`` string. Allowed variables: ``{original_caption}`` (the alt-text or old caption, may be
empty), ``{hint}`` (a ready-made sentence that offers the original caption as a hint, or empty when there is none),
``{tags}``, ``{file_name}``, ``{folder}`` and ``{target_words}``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

TEMPLATE_VARIABLES = ("original_caption", "hint", "tags", "file_name", "folder", "target_words")


@dataclass(frozen=True)
class PromptPreset:
    """A named prompt with the caption length it aims for."""

    template: str
    target_words: int


PRESETS: dict[str, PromptPreset] = {
    # The Lens instruction (LENS_SPEC 3.1) asks for colour, shape, size, texture, quantity, text and spatial
    # relationships of the objects and the background; Lens-800M captions average about 109 words.
    "dense": PromptPreset(
        template=(
            "Describe this image in one paragraph of about {target_words} words for training a text-to-image model. "
            "Describe the colour, shape, size, texture and quantity of the objects, any visible text (quote it "
            "exactly), the spatial relationships between the objects, and the background. State only what is "
            "visible: no speculation, no opinions, no mention of the camera or of 'this image'. Start directly "
            "with the main subject.{hint}"
        ),
        target_words=100,
    ),
    "short": PromptPreset(
        template=(
            "Describe this image in one sentence of about {target_words} words: the main subject, its colour and "
            "the setting. State only what is visible.{hint}"
        ),
        target_words=25,
    ),
    "tags": PromptPreset(
        template=(
            "List about {target_words} comma-separated lowercase tags for this image: subjects, colours, materials, "
            "style, setting, visible text. Output only the tags.{hint}"
        ),
        target_words=20,
    ),
}


def _hint(original_caption: str, tags: str) -> str:
    parts = []
    if original_caption:
        parts.append(
            f' The original alt-text was: "{original_caption}". Use it as a hint for names, places and text, '
            "but describe only what you can see and ignore it where the image disagrees."
        )
    if tags:
        parts.append(f" Tags given with the image: {tags}.")
    return "".join(parts)


def check_template(template: str) -> None:
    """Raise ``ValueError`` if ``template`` uses a variable other than ``TEMPLATE_VARIABLES`` or is malformed."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(
            f"prompt template is malformed ({error}); use {{name}} for variables and {{{{ }}}} for braces"
        ) from None
    unknown = sorted({name for name in names if name not in TEMPLATE_VARIABLES})
    if unknown:
        raise ValueError(
            f"prompt template uses unknown variable(s) {unknown}; allowed: {', '.join(TEMPLATE_VARIABLES)}"
        )


@dataclass(frozen=True)
class PromptTemplate:
    """A checked template plus its target length; ``render`` fills it for one image."""

    template: str
    target_words: int

    @classmethod
    def resolve(cls, preset: str, custom: str | None = None, target_words: int | None = None) -> PromptTemplate:
        """Pick the preset (or a custom template) and the target length; validates the template."""
        if preset not in PRESETS:
            raise ValueError(f"template={preset!r} is not a preset; choose one of {', '.join(PRESETS)}")
        chosen = PRESETS[preset]
        template = custom if custom else chosen.template
        check_template(template)
        return cls(template=template, target_words=target_words or chosen.target_words)

    def render(self, *, original_caption: str = "", tags: str = "", file_name: str = "", folder: str = "") -> str:
        """The prompt for one image; the original caption becomes a hint only when there is one."""
        original_caption = " ".join(original_caption.split())  # one line: alt-text often carries stray newlines
        return self.template.format(
            original_caption=original_caption,
            hint=_hint(original_caption, tags.strip()),
            tags=tags.strip(),
            file_name=file_name,
            folder=folder,
            target_words=self.target_words,
        )
