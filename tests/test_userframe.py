"""Fallback warnings point at the user's line, whatever installed code wraps the call."""
import sys
import textwrap
import warnings

import torch

import attnlib
from attnlib import userframe


def _fallback_call():
    q = torch.randn(1, 3, 2, 8)
    attnlib.attention(q, q, q, backend="flash")       # flash cannot run on a CPU: one fallback warning


def _load(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    sys.path.insert(0, str(tmp_path))
    try:
        return __import__(name), str(path)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def _warned_files(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [x.filename for x in w if "attnlib: backend" in str(x.message)]


def test_an_installed_wrapper_is_skipped_without_being_named(tmp_path, monkeypatch):
    """A wrapper in an installed location (here: a directory registered as a library root, as site-packages
    is) is skipped; the user's line that called it is reported."""
    lib = tmp_path / "lib"
    lib.mkdir()
    wrapper, _ = _load(lib, "some_wrapper_pkg", """
        def wrap(fn):
            def inner(*a, **kw):
                return fn(*a, **kw)
            return inner
    """)
    monkeypatch.setattr(userframe, "_extra_roots", [str(lib)])
    monkeypatch.setattr(userframe, "_roots_cache", [])
    monkeypatch.setattr(userframe, "_verdicts", {})
    files = _warned_files(lambda: wrapper.wrap(_fallback_call)())   # this line is the user's
    assert files == [__file__]


def test_a_users_own_helper_module_is_the_users_code(tmp_path):
    """Code outside installed packages is the user's: the line in their own helper module that calls
    attnlib is reported, not the test that called the helper."""
    helpers, path = _load(tmp_path, "my_project_attention", """
        import torch, attnlib

        def attend(q):
            return attnlib.attention(q, q, q, backend="flash")
    """)
    assert _warned_files(lambda: helpers.attend(torch.randn(1, 3, 2, 8))) == [path]


def test_python_dash_c_code_is_user_code_and_generated_code_is_not():
    assert not userframe.is_library_file("<string>")
    assert not userframe.is_library_file("<stdin>")
    assert userframe.is_library_file("<frozen importlib._bootstrap>")
    assert userframe.is_library_file("<eval_with_key>.3")
    assert userframe.is_library_file(torch.__file__)
    assert userframe.is_library_file(attnlib.__file__)
    assert userframe.is_library_file(warnings.__file__)
    assert not userframe.is_library_file(__file__)
