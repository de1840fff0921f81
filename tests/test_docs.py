"""The README stays in step with the code."""

import os

from conftest import ROOT

import wsboard

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_the_readme_configuration_table_has_every_option_with_its_default():
    for option in wsboard.OPTIONS:
        default = f"`{option.default}`" if option.default else "none"
        row = f"| `{option.flag}` | `{option.env}` | {default} |"
        assert row in README, f"README lacks the row for {option.flag}: {row}"


def test_the_readme_documents_every_control_answer():
    for text in (
        "=== START ===",
        "=== END ===",
        "ERROR Client Not Found",
        "ERROR Unknown command",
        "ERROR Missing message text",
        "ERROR Message is not valid UTF-8",
        "ERROR Invalid client id",
        "ERROR Line too long",
    ):
        assert text in README, text


def test_the_readme_test_command_is_what_ci_runs():
    assert "tests/run " in README.split("```sh", 1)[1].split("```", 1)[0]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert ci.rstrip().endswith("tests/run")
