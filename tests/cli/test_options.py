"""Every edit option's default and bounds agree in ``prism edit --help``, /openapi.json and EditParams;
list flags take the API's syntax."""

import re
import subprocess

import annotated_types
import pytest

from cli import build_parser
from cli.options import format_default, model_from_args
from models.request.params import FILE_NAMES, EditOptions, EditParams
from service.api.app import create_app
from tests.stack import prism

FIELDS = list(EditOptions.model_fields)
SYMBOLS = {">=": "ge", ">": "gt", "<=": "le", "<": "lt"}


@pytest.fixture(scope="module")
def help_facts() -> dict[str, dict]:
    """Per flag, the ``(default: D; bounds)`` that ``prism edit --help`` prints."""
    text = " ".join(subprocess.run(prism("edit", "--help"), capture_output=True, text=True, check=True).stdout.split())
    options = text[text.index("edit options (as in the API):") :]
    facts = {}
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        match = re.search(re.escape(flag) + r" (?:[A-Z_]+|\{[^}]*\}).*?\(default: ([^;)]*)((?:; [^)]*)?)\)", options)
        assert match, f"{flag} is missing from prism edit --help"
        bounds = {}
        for symbol, value in re.findall(r"(>=|<=|>|<)(-?[0-9.]+)", match.group(2)):
            bounds[SYMBOLS[symbol]] = float(value)
        count = re.search(r"(\d+)-(\d+) values", match.group(2))
        if count:
            bounds["min_items"], bounds["max_items"] = int(count.group(1)), int(count.group(2))
        facts[name] = {"default": match.group(1), **bounds}
    return facts


@pytest.fixture(scope="module")
def schema_facts() -> dict[str, dict]:
    """Per form field of POST /counterfactual, its default and bounds in the OpenAPI schema."""
    spec = create_app().openapi()
    ref = spec["paths"]["/counterfactual"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    properties = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]["properties"]
    keys = {"minimum": "ge", "exclusiveMinimum": "gt", "maximum": "le", "exclusiveMaximum": "lt"}
    facts = {}
    for name in FIELDS:
        prop = properties[name]
        typed = next((s for s in prop.get("anyOf", []) if s.get("type") != "null"), prop)  # optional fields
        bounds_from = typed.get("items", typed) if typed.get("type") == "array" else typed
        facts[name] = {
            "default": format_default(prop.get("default")),
            **{keys[k]: float(v) for k, v in bounds_from.items() if k in keys},
            **({"min_items": prop["minItems"]} if "minItems" in prop else {}),
            **({"max_items": prop["maxItems"]} if "maxItems" in prop else {}),
        }
    return facts


def declared_facts(name: str) -> dict:
    """What EditParams itself says: the default of a fresh instance and the field's constraints."""
    field = EditParams.model_fields[name]
    metadata = list(field.metadata)
    if field.annotation is not None and getattr(field.annotation, "__args__", None):
        item = field.annotation.__args__[0]
        metadata += [m for a in getattr(item, "__metadata__", ()) for m in getattr(a, "metadata", [a])]
    facts = {"default": format_default(getattr(EditParams(), name))}
    for m in metadata:
        for kind, attr in ((annotated_types.Ge, "ge"), (annotated_types.Gt, "gt"), (annotated_types.Le, "le")):
            if isinstance(m, kind):
                facts[attr] = float(getattr(m, attr))
        if isinstance(m, annotated_types.Lt):
            facts["lt"] = float(m.lt)
        if isinstance(m, annotated_types.MinLen):
            facts["min_items"] = m.min_length
        if isinstance(m, annotated_types.MaxLen):
            facts["max_items"] = m.max_length
    return facts


@pytest.mark.parametrize("name", FIELDS)
def test_help_openapi_and_edit_params_agree(name, help_facts, schema_facts):
    declared = declared_facts(name)
    assert help_facts[name] == declared, "prism edit --help"
    assert schema_facts[name] == declared, "/openapi.json"


def test_every_bounded_number_is_bounded_on_both_sides():
    for name in ("steps", "guidance_scale", "cross_replace_steps", "edit_word_weight", "blend_threshold", "seed"):
        facts = declared_facts(name)
        assert {"ge", "gt"} & set(facts) and {"le", "lt"} & set(facts), name


REQUIRED = {
    "edit": ["--image", "x.png", "--out", "o"],
    "submit": ["--image", "x.png", "--out", "o"],
    "batch": ["--images", "d", "--manifest", "m.csv", "--out", "o"],
}


@pytest.mark.parametrize("command", list(REQUIRED))
def test_outputs_is_a_flag_of_every_edit_command_in_the_api_s_list_syntax(command):
    def options(*flags: str) -> EditOptions:
        return model_from_args(EditOptions, build_parser().parse_args([command, *REQUIRED[command], *flags]))

    assert options().outputs == FILE_NAMES
    chosen = options("--outputs", "counterfactual.dcm", "difference.npy,counterfactual.png").outputs
    assert chosen == ("counterfactual.png", "difference.npy", "result.json", "counterfactual.dcm")
    with pytest.raises(ValueError, match=r"^--outputs: Input should be 'counterfactual.png', 'difference.png'"):
        options("--outputs", "counterfactual.jpg")
    with pytest.raises(ValueError, match=r"^--outputs: name at least one of counterfactual.png"):
        options("--outputs", ",")
