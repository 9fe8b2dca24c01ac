"""Typed errors for wrong-typed input on every endpoint.

Gradio's own preprocessing turns a number field sent as "abc" into a bare "upstream Gradio app has raised an
exception", and silently stringifies anything sent to a textbox. `enforce_input_types(blocks)` gives every input
component of the app a checking subclass (a Gradio "template": the browser uses the parent's widget unchanged) whose
`preprocess` first checks the JSON type and raises `gr.Error` naming the field and what it takes. It walks the built
page, so components added later are covered without touching their tab's code.
"""

from __future__ import annotations

import abc
import functools
import math

import gradio as gr
import pydantic


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(component) -> str:
    return getattr(component, "label", None) or type(component).__mro__[1].__name__


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _refuse(component, value, expected: str) -> None:
    raise gr.Error(
        f"{_name(component)} must be {expected}, got {_shown(value)} ({type(value).__name__}).",
        title="Wrong type",
        print_exception=False,
    )


def _check_number(component, value) -> None:
    if value is not None and not _is_number(value):
        _refuse(component, value, "a number")


def _check_slider(component, value) -> None:
    if not _is_number(value):
        _refuse(component, value, "a number")


def _check_text(component, value) -> None:
    if value is not None and not isinstance(value, str):
        _refuse(component, value, "text")


def _check_bool(component, value) -> None:
    if value is not None and not isinstance(value, bool):
        _refuse(component, value, "true or false")


def _check_choice(component, value) -> None:
    allowed = (str, int, float, list) if getattr(component, "multiselect", False) else (str, int, float)
    if value is not None and (isinstance(value, bool) or not isinstance(value, allowed)):
        _refuse(component, value, "one of the choices")


def _check_choices(component, value) -> None:
    if value is not None and not (
        isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value)
    ):
        _refuse(component, value, "a list of choices")


CHECKS = {
    gr.Number: _check_number,
    gr.Slider: _check_slider,
    gr.Textbox: _check_text,
    gr.Checkbox: _check_bool,
    gr.Radio: _check_choice,
    gr.Dropdown: _check_choice,
    gr.CheckboxGroup: _check_choices,
    gr.File: lambda component, value: None,  # checked by its data model, see _checked_file_model
}


@functools.cache
def _checked_file_model(model: type, name: str) -> type:
    """`model` (Gradio's FileData / ListFiles) whose validation failure is a `gr.Error` naming the field. Gradio
    validates file payloads before any preprocess runs, so this is where a wrong-typed file parameter is caught."""

    def model_validate(cls, payload, *args, **kwargs):
        try:
            return model.model_validate(payload, *args, **kwargs)
        except pydantic.ValidationError:
            raise gr.Error(
                f"{name} must be a file uploaded to this app (gradio_client: handle_file(path)), got "
                f"{_shown(payload)} ({type(payload).__name__}).",
                title="Wrong type",
                print_exception=False,
            ) from None

    namespace = {"model_validate": classmethod(model_validate), "__module__": model.__module__}
    return type(model.__name__, (model,), namespace)


def _file_model_property() -> property:
    # gr.File sets `self.data_model` in __init__; this property keeps that value and hands out the checked model.
    def get(self):
        model = self.__dict__.get("_unchecked_data_model", self.__dict__.get("data_model"))
        return None if model is None else _checked_file_model(model, _name(self))

    def set(self, model) -> None:
        self.__dict__["_unchecked_data_model"] = model

    return property(get, set)


def _strict_class(base: type, check) -> type:
    def preprocess(self, payload):
        check(self, payload)
        return base.preprocess(self, payload)

    # `is_template` makes Gradio name the browser widget after the parent class (`number`, `textbox`, ...). The class
    # is made by ABCMeta, the base of Gradio's ComponentMeta, because ComponentMeta would also write a `.pyi` stub
    # next to this file (its custom-component tooling); the events are inherited from `base` unchanged.
    namespace = {"is_template": True, "preprocess": preprocess, "__module__": __name__, "__doc__": base.__doc__}
    if base is gr.File:
        namespace["data_model"] = _file_model_property()
    return abc.ABCMeta.__new__(type(base), f"Typed{base.__name__}", (base,), namespace)


STRICT_CLASSES = {base: _strict_class(base, check) for base, check in CHECKS.items()}


def enforce_input_types(blocks: gr.Blocks) -> int:
    """Give every component of `blocks` that an event reads its checking class; returns how many changed. Gradio
    copies a component per session with `type(component)(**props)`, so the copies check too."""
    inputs = {component._id for fn in blocks.fns.values() for component in fn.inputs}
    changed = 0
    for block in blocks.blocks.values():
        strict = STRICT_CLASSES.get(type(block))
        if strict is not None and block._id in inputs:
            block.__class__ = strict
            changed += 1
    return changed
