"""The import hook of lpcam_adapters.hooks, against stand-in host packages written to tmp_path."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import subprocess
import sys
import textwrap
import uuid

import pytest

from lpcam_adapters import hooks


@pytest.fixture()
def fake_host(tmp_path, monkeypatch):
    """A namespace package ``<pkg>.mod`` (no __init__, like IRN's ``step``) on sys.path; unique name per test."""
    pkg = f"fakestep_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "mod.py").write_text(
        textwrap.dedent(
            """
            EXECUTIONS = []
            EXECUTIONS.append(1)
            VALUE = "original"

            def run(args):
                return ("host run", args)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield pkg, tmp_path
    for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def isolated_hooks():
    with hooks.scoped():
        yield


def _set_value(new):
    def patch(module):
        old = module.VALUE
        module.VALUE = new

        def undo():
            module.VALUE = old

        return undo

    return patch


def test_patch_applies_when_module_is_imported_later(fake_host):
    pkg, _ = fake_host
    calls = []

    def patch(module):
        calls.append(module)
        module.VALUE = "patched"

    hooks.register_patch(f"{pkg}.mod", "VALUE", patch)
    assert f"{pkg}.mod" not in sys.modules, "registration must not import the host module"
    mod = importlib.import_module(f"{pkg}.mod")
    assert mod.VALUE == "patched"
    assert calls == [mod]
    assert hooks.applied_patches(mod) == ["VALUE"]
    # The real loader stays visible: inspect and linecache work on the patched module.
    assert type(mod.__loader__).__name__ == "SourceFileLoader"
    assert "def run" in inspect.getsource(mod)


def test_patch_applies_immediately_to_imported_module(fake_host):
    pkg, _ = fake_host
    mod = importlib.import_module(f"{pkg}.mod")
    hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("now"))
    assert mod.VALUE == "now"


def test_once_per_module_object_and_idempotent_registration(fake_host):
    pkg, _ = fake_host
    count = []

    def patch(module):
        count.append(1)
        module.VALUE += "+p"

    hooks.register_patch(f"{pkg}.mod", "p", patch)
    hooks.register_patch(f"{pkg}.mod", "p", patch)  # same function: no-op
    mod = importlib.import_module(f"{pkg}.mod")
    assert hooks.apply_patches(mod) == []
    hooks.install()
    assert mod.VALUE == "original+p" and len(count) == 1
    # A fresh module object (re-import after removal) is patched again, once.
    del sys.modules[f"{pkg}.mod"]
    mod2 = importlib.import_module(f"{pkg}.mod")
    assert mod2 is not mod and mod2.VALUE == "original+p" and len(count) == 2


def test_reload_reapplies_after_the_module_code_reran(fake_host):
    pkg, _ = fake_host
    hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("patched"))
    mod = importlib.import_module(f"{pkg}.mod")
    mod = importlib.reload(mod)
    assert mod.EXECUTIONS == [1] and mod.VALUE == "patched"
    assert hooks.applied_patches(mod) == ["VALUE"]


def test_different_function_under_same_name_needs_replace(fake_host):
    pkg, _ = fake_host
    mod = importlib.import_module(f"{pkg}.mod")
    hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("first"))
    with pytest.raises(ValueError, match="already registered"):
        hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("second"))
    hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("second"), replace=True)
    assert mod.VALUE == "second"
    hooks.unregister_patch(f"{pkg}.mod", "VALUE")
    assert mod.VALUE == "original"
    with pytest.raises(KeyError):
        hooks.unregister_patch(f"{pkg}.mod", "VALUE")


def test_replace_attribute_keeps_original_and_is_idempotent(fake_host):
    pkg, _ = fake_host

    def make(orig, module):
        def run(args):
            return ("lpcam", orig(args))

        return run

    hooks.replace_attribute(f"{pkg}.mod", "run", make, description="swap run")
    hooks.replace_attribute(f"{pkg}.mod", "run", make, description="swap run")  # same make: no-op
    mod = importlib.import_module(f"{pkg}.mod")
    assert mod.run(1) == ("lpcam", ("host run", 1))
    assert hooks.original(mod.run)(2) == ("host run", 2)
    assert hooks.original(len) is len


def test_scoped_restores_everything(fake_host):
    pkg, _ = fake_host
    mod = importlib.import_module(f"{pkg}.mod")
    was_installed = hooks.is_installed()
    with hooks.scoped():
        hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("inner"))
        assert mod.VALUE == "inner" and hooks.is_installed()
    assert mod.VALUE == "original"
    assert hooks.is_installed() == was_installed
    assert all(p.module != f"{pkg}.mod" for p in hooks.describe_patches())


def test_uninstall_restores_and_install_reapplies(fake_host):
    pkg, _ = fake_host
    mod = importlib.import_module(f"{pkg}.mod")
    hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("patched"))
    hooks.uninstall()
    assert mod.VALUE == "original" and not hooks.is_installed()
    del sys.modules[f"{pkg}.mod"]
    assert importlib.import_module(f"{pkg}.mod").VALUE == "original"  # hook out: not patched
    hooks.install()
    assert sys.modules[f"{pkg}.mod"].VALUE == "patched"
    assert sys.meta_path[0] is hooks._finder


def test_requires_skips_modules_of_another_project(fake_host, caplog):
    pkg, _ = fake_host
    hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("x"), requires=("_work",), description="needs _work")
    with caplog.at_level(logging.WARNING, logger="lpcam_adapters.hooks"):
        mod = importlib.import_module(f"{pkg}.mod")
    assert mod.VALUE == "original"
    assert "lacks ['_work']" in caplog.text
    (info,) = [p for p in hooks.describe_patches(pkg)]
    assert info.status == "skipped"


def test_failing_patch_raises_patch_error_naming_it(fake_host):
    pkg, _ = fake_host

    def broken(module):
        raise RuntimeError("boom")

    hooks.register_patch(f"{pkg}.mod", "broken", broken)
    with pytest.raises(hooks.PatchError, match=rf"{pkg}.mod:broken .*boom"):
        importlib.import_module(f"{pkg}.mod")
    with pytest.raises(TypeError):
        hooks.register_patch(f"{pkg}.mod", "x", "not callable")


def test_before_exec_patch_is_temporary(fake_host):
    pkg, tmp = fake_host
    (tmp / pkg / "uses.py").write_text("import json\nSEEN = json.MARK\n")
    importlib.invalidate_caches()
    import json

    def mark(module):
        json.MARK = "during exec"

        def undo():
            del json.MARK

        return undo

    hooks.register_patch(f"{pkg}.uses", "mark", mark, before_exec=True)
    mod = importlib.import_module(f"{pkg}.uses")
    assert mod.SEEN == "during exec"
    assert not hasattr(json, "MARK")
    assert [p.status for p in hooks.describe_patches(f"{pkg}.uses")] == ["applied at import"]


def test_fallback_only_when_module_is_missing(fake_host):
    pkg, _ = fake_host
    missing = f"{pkg}_missing"

    def fill(module):
        module.STAND_IN = True

    hooks.register_fallback(missing, fill, description="stand-in")
    hooks.register_fallback(f"{pkg}.mod", fill, description="never used: the real one exists")
    assert importlib.import_module(missing).STAND_IN is True
    assert not hasattr(importlib.import_module(f"{pkg}.mod"), "STAND_IN")
    statuses = {p.module: p.status for p in hooks.describe_patches(pkg)}
    assert statuses[missing].startswith("active")
    assert statuses[f"{pkg}.mod"].startswith("inactive")


def test_installed_does_not_count_a_stand_in(fake_host):
    """find_spec reports lpcam's stand-in as importable; ``installed`` asks whether the real module is there
    (what the try paths decide the CRF step and their up-front refusals on)."""
    pkg, _ = fake_host
    missing = f"{pkg}_crf"
    with hooks.scoped():
        hooks.register_fallback(missing, lambda m: None)
        assert importlib.util.find_spec(missing) is not None  # the stand-in
        assert not hooks.installed(missing)
        importlib.import_module(missing)  # served, and still not the real one
        assert not hooks.installed(missing)
        assert hooks.installed(pkg) and hooks.installed("json")


def test_scoped_drops_served_fallbacks(fake_host):
    pkg, _ = fake_host
    name = f"{pkg}_gone"
    with hooks.scoped():
        hooks.register_fallback(name, lambda m: None, is_package=True)
        hooks.register_fallback(f"{name}.sub", lambda m: None)
        importlib.import_module(f"{name}.sub")
        assert name in sys.modules
    assert name not in sys.modules and f"{name}.sub" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


def test_explain_lists_patches(fake_host):
    pkg, _ = fake_host
    hooks.replace_attribute(f"{pkg}.mod", "run", lambda o, m: o, description="what run becomes")
    text = hooks.explain(pkg)
    assert f"{pkg}.mod:run" in text and "pending" in text and "what run becomes" in text
    (info,) = hooks.describe_patches(pkg)
    assert info.owner == __name__
    assert hooks.explain("no-such-prefix") == "no lpcam patches registered"


# --------------------------------------------------------------------------- spawned workers

_ADAPTER = '''
from lpcam_adapters import hooks

def _make(orig, module):
    return "patched in " + __name__

hooks.replace_attribute("{pkg}.mod", "VALUE", _make)

def worker(index, out):
    import {pkg}.mod
    with open(out, "w") as handle:
        handle.write({pkg}.mod.VALUE)
'''

_HOST_WORKER = '''
def host_worker(index, out):
    with open(out, "w") as handle:
        handle.write(VALUE)
'''

_MAIN = '''
import {top_import}
import multiprocessing as mp
import sys

def main():
    import {pkg}.mod
    import {pkg}_adapter
    ctx = mp.get_context("spawn")
    target = {target}
    p = ctx.Process(target=target, args=(0, sys.argv[1]))
    p.start()
    p.join()
    sys.exit(p.exitcode)

if __name__ == "__main__":
    main()
'''


@pytest.mark.parametrize(
    "top_import, target",
    [
        # The adapter imported at the top of the host's main script: re-run as __mp_main__ in the child.
        ("{pkg}_adapter", "{pkg}.mod.host_worker"),
        # The worker defined in the adapter: unpickling it imports the adapter in the child.
        ("os", "{pkg}_adapter.worker"),
    ],
    ids=["adapter-in-main-script", "worker-in-adapter"],
)
def test_spawned_worker_sees_the_patch(fake_host, top_import, target):
    pkg, tmp = fake_host
    with open(tmp / pkg / "mod.py", "a") as handle:
        handle.write(_HOST_WORKER)
    (tmp / f"{pkg}_adapter.py").write_text(_ADAPTER.format(pkg=pkg))
    main = tmp / "main.py"
    main.write_text(_MAIN.format(pkg=pkg, top_import=top_import.format(pkg=pkg), target=target.format(pkg=pkg)))
    out = tmp / "out.txt"
    proc = subprocess.run([sys.executable, str(main), str(out)], cwd=tmp, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == f"patched in {pkg}_adapter"


_TORCH_MAIN = '''
import {pkg}_adapter  # first line of the host's main script
import sys
import torch.multiprocessing
import {pkg}.mod

if __name__ == "__main__":
    torch.multiprocessing.spawn({pkg}.mod.host_worker, nprocs=1, args=(sys.argv[1],), join=True)
'''


@pytest.mark.slow
def test_torch_spawn_worker_sees_the_patch(fake_host):
    pkg, tmp = fake_host
    with open(tmp / pkg / "mod.py", "a") as handle:
        handle.write(_HOST_WORKER)
    (tmp / f"{pkg}_adapter.py").write_text(_ADAPTER.format(pkg=pkg))
    main = tmp / "main.py"
    main.write_text(_TORCH_MAIN.format(pkg=pkg))
    out = tmp / "out.txt"
    proc = subprocess.run([sys.executable, str(main), str(out)], cwd=tmp, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == f"patched in {pkg}_adapter"


def test_replacing_another_owners_patch_is_logged(fake_host, caplog):
    pkg, _ = fake_host
    hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("a"), owner="adapter_a")
    with caplog.at_level(logging.INFO, logger="lpcam_adapters.hooks"):
        hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("b"), owner="adapter_b", replace=True)
    assert "replaced by adapter_b" in caplog.text and "WARNING" not in caplog.text
    mod = importlib.import_module(f"{pkg}.mod")
    assert mod.VALUE == "b"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lpcam_adapters.hooks"):
        hooks.register_patch(f"{pkg}.mod", "VALUE", _set_value("c"), owner="adapter_c", replace=True)
    assert "already applied" in caplog.text and any(r.levelno == logging.WARNING for r in caplog.records)
    assert mod.VALUE == "c"
