"""The README's commands are the CLI's: every ``prism`` command in its shell blocks parses with
the real parser (so no flag in the README is stale), and every input file they name is one that
``prism make-example`` writes."""

import re
import shlex
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cli import build_parser
from models.imaging.files import decode_image, keep_mask
from models.request.manifest import find_file, read_manifest
from models.request.resolve import EditRequest
from phantoms.example import BATCH_FILES, FILES, write_batch_example, write_examples

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _shell_lines() -> list[str]:
    """The README's sh blocks, one logical line each (continuations joined, prompts cut)."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.removeprefix("$ ").strip())
    return lines


def _prism_commands() -> list[list[str]]:
    commands = []
    for line in _shell_lines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
            words.pop(0)
        if words and Path(words[0]).name == "prism" and "[" not in line:  # [--flag X] is syntax, not a command
            commands.append([w for w in words[1:] if w != "&"])
    return commands


COMMANDS = _prism_commands()


def test_the_readme_has_the_commands_a_newcomer_runs():
    assert len(COMMANDS) >= 15
    assert {c[0] for c in COMMANDS} >= {"make-example", "edit", "submit", "batch", "keys", "bench-phantom", "finetune"}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_readme_command_parses(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_every_input_file_the_readme_names_is_written_by_make_example(tmp_path):
    named = set(re.findall(r"(?:--image|--mask|image=@)\s*([\w./-]+\.(?:png|dcm|jpg))", README))
    named |= set(re.findall(r'submit\("([\w./-]+)"', README))
    assert named and named <= set(FILES), named - set(FILES)
    written = write_examples(tmp_path)
    assert [p.name for p in written] == list(FILES)
    png, dicom, mask = (decode_image(p.read_bytes()) for p in written)
    assert dicom.dicom is not None and np.abs(dicom.pixels - png.pixels).max() < 1e-3  # one image, two files
    assert png.pixels.shape == mask.pixels.shape == (128, 104) and 0.05 < keep_mask(mask).mean() < 0.5


def test_the_batch_example_is_what_make_example_writes_and_it_resolves(tmp_path):
    named = set(re.findall(r"(?:images=@|manifest=@)([\w./-]+)", README))
    for argv in (c for c in COMMANDS if c[0] == "batch"):
        args = build_parser().parse_args(argv)
        named |= {args.images, args.manifest}
    assert named == set(BATCH_FILES), named
    archive, manifest, folder = write_batch_example(tmp_path)
    plan = read_manifest(manifest.read_bytes(), EditRequest(edit="Support Devices=0"))
    assert not plan.errors and len(plan.items) == 8
    assert 0 < sum(item.skipped is not None for item in plan.items) < 8
    names = set(zipfile.ZipFile(archive).namelist())
    assert names == {item.path for item in plan.items}
    assert all(find_file(folder, item.path) for item in plan.items)


def test_the_configuration_table_is_every_setting_the_code_reads():
    """One row per setting (PRISM_PACS_FILE and its retries among them), and no row the code ignores."""
    from service.contract.settings import Settings

    section = README.split("## Configuration (environment)")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(PRISM_[A-Z0-9_]+)` \|", section, flags=re.M)
    assert len(rows) == len(set(rows)), "a setting listed twice"
    assert set(rows) == {f"PRISM_{name.upper()}" for name in Settings.model_fields}


def test_the_endpoints_example_is_a_file_the_service_accepts(tmp_path):
    """The README's pacs.toml, with its secret files made under tmp_path: every key is one the
    service reads, and every rule it states holds (a password file for basic auth)."""
    from service.contract.pacs import load_endpoints

    (block,) = re.findall(r"```toml\n(.*?)```", README, flags=re.S)
    for path in set(re.findall(r'_(?:file|bundle) = "([^"]+)"', block)):
        local = tmp_path / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("secret\n")
        block = block.replace(f'"{path}"', f'"{local}"')
    (tmp_path / "pacs.toml").write_text(block)
    endpoints = load_endpoints(str(tmp_path / "pacs.toml"))
    assert set(endpoints) == {"radiology", "archive"}
    assert endpoints["radiology"].dicomweb.auth == "basic" and endpoints["radiology"].dicom.port == 4242
    assert endpoints["archive"].dicomweb is None and endpoints["archive"].dicom.calling_ae == "PRISM"
