"""`package.module:name` references: resolved, or refused with the reason and what to do."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.entrypoints import ENTRY_POINT_PATTERN, EntryPointError, load_entry_point
from node.errors import ExitCode


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """A package `teamcode` on sys.path, with a good module and three broken ones."""
    root = tmp_path / "teamcode"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "good.py").write_text(
        textwrap.dedent(
            """
            VALUE = 42

            def make(n):
                return n + 1

            class Holder:
                @staticmethod
                def build():
                    return "built"
            """
        )
    )
    (root / "needsdep.py").write_text("import a_dependency_nobody_installed\n")
    (root / "raises.py").write_text("raise RuntimeError('the module is broken')\n")
    (root / "syntax.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [m for m in sys.modules if m == "teamcode" or m.startswith("teamcode.")]:
        del sys.modules[name]


def test_functions_classes_and_dotted_attributes_resolve(package) -> None:
    assert load_entry_point("teamcode.sub.good:make", field="model.factory")(1) == 2
    build = load_entry_point("teamcode.sub.good:Holder.build", field="train.trainer")
    assert build() == "built"


@pytest.mark.parametrize(
    ("reference", "words"),
    [
        ("teamcode.sub.good", "is not a 'package.module:name' reference"),
        ("teamcode/sub:make", "is not a 'package.module:name' reference"),
        ("not_installed_pkg.models:net", "no module named 'not_installed_pkg' in this environment"),
        ("teamcode.missing:net", "no module named 'teamcode.missing'"),
        ("teamcode.needsdep:net", "it needs a module this environment lacks"),
        ("teamcode.raises:net", "raised RuntimeError: the module is broken"),
        ("teamcode.syntax:net", "raised SyntaxError"),
        ("teamcode.sub.good:nett", "has no attribute 'nett'"),
        ("teamcode.sub.good:VALUE", "is a int, not a function or class"),
    ],
)
def test_each_failure_names_the_field_the_reference_and_the_reason(
    package, reference: str, words: str
) -> None:
    with pytest.raises(EntryPointError) as info:
        load_entry_point(reference, field="data.loader")
    message = str(info.value)
    assert message.startswith(f"data.loader = {reference!r}")
    assert words in message
    assert info.value.exit_code == ExitCode.CONFIG


def test_a_module_that_is_missing_says_how_to_install_it(package) -> None:
    with pytest.raises(EntryPointError, match=r"install the package .* or put the folder"):
        load_entry_point("not_installed_pkg:net", field="model.factory")


def test_a_non_callable_is_fine_when_asked_for(package) -> None:
    assert load_entry_point("teamcode.sub.good:VALUE", field="x", callable_=False) == 42


_IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)


@given(
    st.lists(_IDENT, min_size=1, max_size=4),
    st.lists(_IDENT, min_size=1, max_size=3),
)
def test_the_config_pattern_accepts_exactly_dotted_module_colon_dotted_name(mod, attr) -> None:
    import re

    good = f"{'.'.join(mod)}:{'.'.join(attr)}"
    assert re.match(ENTRY_POINT_PATTERN, good)
    for bad in (good.replace(":", "."), good + ":x", "." + good, good + ".", f"{good} "):
        assert not re.match(ENTRY_POINT_PATTERN, bad)
