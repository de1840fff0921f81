"""The README and docs/ stay in step with the code."""

import os

from conftest import ROOT

import wsboard

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def doc(name: str) -> str:
    return open(os.path.join(ROOT, "docs", name), encoding="utf-8").read()


def test_the_configuration_table_has_every_option_with_its_default():
    table = doc("configuration.md")
    for option in wsboard.OPTIONS:
        default = f"`{option.default}`" if option.default else "none"
        row = f"| `{option.flag}` | `{option.env}` | {default} |"
        assert row in table, f"docs/configuration.md lacks the row for {option.flag}: {row}"


def test_every_control_refusal_the_code_can_give_is_documented():
    documented = README + doc("protocol.md")
    assert len(wsboard.CONTROL_REFUSALS) >= 17
    for text in wsboard.CONTROL_REFUSALS:
        assert f"ERROR {text.split(' (')[0]}" in documented, text
    for listing in wsboard.framed([]):
        assert listing in README


def test_the_readme_points_at_every_document():
    for name in os.listdir(os.path.join(ROOT, "docs")):
        assert f"(docs/{name})" in README, name
    assert len(README.splitlines()) < 400  # what a newcomer needs; the reference is in docs/


def test_the_readme_test_command_is_what_ci_runs():
    assert "tests/run " in README.split("```sh", 1)[1].split("```", 1)[0]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert ci.rstrip().endswith("tests/run")
