"""Import hook that applies named patches to host modules as they load.

Host codebases (IRN, ReCAM, ...) give no extension point: their drivers are plain functions
in modules such as ``step.make_cam``, imported by name relative to the working directory,
and re-imported by name in every ``torch.multiprocessing.spawn`` worker. This module keeps a
registry of *named* patches per module name and a ``sys.meta_path`` finder that runs them on
each fresh module object right after the module's own code has executed:

* ``register_patch("step.make_cam", "run", fn)``: ``fn(module)`` runs once per module object,
  at import, or immediately when the module is already imported. It may return an undo
  callable, run by :func:`unregister_patch`, :func:`uninstall` or :func:`scoped`.
* ``replace_attribute(...)``: the common case, a patch named after the attribute it replaces.
* ``register_fallback("chainercv", factory)``: a stand-in module served only when no other
  finder can import the real one.

Nothing here imports a host module. A spawned worker sees the patches when the module that
registers them is imported in the worker before the host module, which happens when it is
imported at the top of the host's main script (re-run as ``__mp_main__``) or when the worker
function pickled by ``spawn`` is defined in the adapter (unpickling imports its module).

Example:
    >>> from lpcam_adapters import hooks
    >>> with hooks.scoped():
    ...     _ = hooks.replace_attribute("json", "dumps", lambda orig, mod: lambda *a, **k: "patched",
    ...                                  description="demo")
    ...     import json
    ...     json.dumps({})
    'patched'
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "Patch",
    "PatchError",
    "PatchInfo",
    "register_patch",
    "replace_attribute",
    "unregister_patch",
    "register_fallback",
    "install",
    "uninstall",
    "is_installed",
    "installed",
    "scoped",
    "apply_patches",
    "applied_patches",
    "original",
    "describe_patches",
    "explain",
    "module_proxy",
]

logger = logging.getLogger(__name__)

Undo = Callable[[], None]
PatchFn = Callable[[ModuleType], "Undo | None"]

_ORIGINAL_ATTR = "__lpcam_original__"
_FALLBACK_ATTR = "__lpcam_fallback__"


class PatchError(RuntimeError):
    """A registered patch failed while being applied to a host module."""


@dataclass(frozen=True)
class Patch:
    """One named change to one module.

    Attributes:
        module: Full module name the patch targets (``"step.make_cam"``).
        name: Patch name, unique per module; by convention what it replaces (``"run"``).
        fn: ``fn(module) -> undo | None``, applied once per module object.
        description: One line for ``--explain``.
        requires: Attributes the module must have; a module without them is another
            project's module of the same name and is left alone (with a warning).
        before_exec: Run ``fn`` just before the module's code executes and its undo right
            after (a temporary change the module's own import needs, e.g. numpy aliases).
        owner: Module that registered the patch.
    """

    module: str
    name: str
    fn: PatchFn
    description: str = ""
    requires: tuple[str, ...] = ()
    before_exec: bool = False
    owner: str = ""


@dataclass(frozen=True)
class _Fallback:
    module: str
    factory: Callable[[ModuleType], None]
    description: str
    is_package: bool
    owner: str


@dataclass(frozen=True)
class PatchInfo:
    """What :func:`describe_patches` reports for one patch or fallback.

    Attributes:
        module: Target module name.
        name: Patch name (``"<fallback>"`` for a stand-in module).
        description: What the patch changes.
        status: ``"applied"``, ``"pending"`` (module not imported yet), ``"skipped"`` (module
            of another project), ``"active"``/``"inactive"`` for fallbacks.
        owner: Module that registered it.
    """

    module: str
    name: str
    description: str
    status: str
    owner: str


_lock = threading.RLock()
_patches: dict[str, dict[str, Patch]] = {}
_fallbacks: dict[str, _Fallback] = {}
# module object -> {patch name: undo}; entries live as long as the module object.
_applied: weakref.WeakKeyDictionary[ModuleType, dict[str, Undo | None]] = weakref.WeakKeyDictionary()
# Every application in order, so undo can run in reverse: (module ref, patch name, token).
_journal: list[tuple[weakref.ReferenceType[ModuleType], str, object]] = []
_skipped: weakref.WeakKeyDictionary[ModuleType, set[str]] = weakref.WeakKeyDictionary()
_served_fallbacks: list[str] = []
_local = threading.local()


# --------------------------------------------------------------------------- registration


def register_patch(
    module: str,
    name: str,
    fn: PatchFn,
    *,
    description: str = "",
    requires: Sequence[str] = (),
    before_exec: bool = False,
    replace: bool = False,
    owner: str | None = None,
) -> Patch:
    """Register ``fn`` as patch ``name`` of ``module`` and install the import hook.

    The patch runs on every fresh module object of that name, once; when the module is
    already imported it runs now. Registering the same ``fn`` under the same name again is a
    no-op (so is :func:`replace_attribute` with the same ``make``); a different ``fn`` needs
    ``replace=True`` (the old one is undone first).

    Args:
        module: Full module name (``"voc12.dataloader"``).
        name: Patch name, unique within ``module``.
        fn: ``fn(module_object) -> undo | None``.
        description: One line for :func:`describe_patches`.
        requires: Attribute names the module must define for the patch to apply.
        before_exec: See :class:`Patch`.
        replace: Allow replacing a different patch registered under the same name.
        owner: Registering module, for ``--explain`` (default: the caller's module).

    Returns:
        The registered :class:`Patch`.

    Raises:
        ValueError: ``name`` is taken by a different function and ``replace`` is False.
        PatchError: applying it to the already-imported module failed.
    """
    if not module or not name:
        raise ValueError("register_patch needs a module name and a patch name")
    if not callable(fn):
        raise TypeError(f"patch {module}:{name}: fn must be callable, got {type(fn).__name__}")
    if owner is None:
        owner = sys._getframe(1).f_globals.get("__name__", "")
    patch = Patch(module, name, fn, description, tuple(requires), before_exec, owner)
    with _lock:
        existing = _patches.get(module, {}).get(name)
        if existing is not None:
            if existing.fn is fn or _same_key(existing.fn, fn):
                install()
                return existing
            if not replace:
                raise ValueError(
                    f"patch {module}:{name} is already registered by {existing.owner or '?'}; "
                    "pass replace=True to replace it"
                )
            loaded = sys.modules.get(module)
            live = loaded is not None and name in _applied.get(loaded, {})
            if existing.owner != owner:
                # Two adapters patching the same host function: the later import wins.
                (logger.warning if live else logger.info)(
                    "patch %s:%s of %s replaced by %s's%s", module, name, existing.owner or "?", owner,
                    " (it was already applied: the host module now runs the new one)" if live else "",
                )
            unregister_patch(module, name)
        _patches.setdefault(module, {})[name] = patch
        install()
        loaded = sys.modules.get(module)
        if loaded is not None and not before_exec:
            apply_patches(loaded)
    return patch


def replace_attribute(
    module: str,
    attribute: str,
    make: Callable[[Any, ModuleType], Any],
    *,
    description: str = "",
    name: str | None = None,
    requires: Sequence[str] = (),
    replace: bool = False,
) -> Patch:
    """Register a patch that swaps ``module.attribute`` for ``make(original, module)``.

    The replacement gets ``__lpcam_original__`` set to the original when it accepts
    attributes (see :func:`original`); undo puts the original back.

    Args:
        module: Full module name.
        attribute: Attribute to replace; also the patch name unless ``name`` is given.
        make: ``make(original, module) -> replacement``.
        description: One line for ``--explain``.
        name: Patch name (default ``attribute``).
        requires: Extra attributes the module must define (``attribute`` always is).
        replace: See :func:`register_patch`.
    """

    def patch(mod: ModuleType) -> Undo:
        had = attribute in vars(mod)
        orig = getattr(mod, attribute)
        new = make(orig, mod)
        try:
            setattr(new, _ORIGINAL_ATTR, orig)
        except (AttributeError, TypeError):
            pass
        setattr(mod, attribute, new)

        def undo() -> None:
            if getattr(mod, attribute, None) is not new:
                logger.warning("%s.%s was changed after patching; restoring the original anyway",
                               mod.__name__, attribute)
            if had:
                setattr(mod, attribute, orig)
            else:  # pragma: no cover - attributes we replace are module globals
                delattr(mod, attribute)

        return undo

    patch.__qualname__ = f"replace_attribute[{module}.{attribute}]"
    patch.__lpcam_key__ = ("replace_attribute", module, attribute, make)  # type: ignore[attr-defined]
    owner = sys._getframe(1).f_globals.get("__name__", "")
    return register_patch(
        module,
        name or attribute,
        patch,
        description=description,
        requires=(attribute, *requires),
        replace=replace,
        owner=owner,
    )


def _same_key(a: Any, b: Any) -> bool:
    key = getattr(a, "__lpcam_key__", None)
    return key is not None and key == getattr(b, "__lpcam_key__", None)


def original(obj: Any) -> Any:
    """The object a :func:`replace_attribute` replacement stands for (``obj`` if none)."""
    return getattr(obj, _ORIGINAL_ATTR, obj)


def unregister_patch(module: str, name: str) -> None:
    """Undo patch ``name`` on every live module object of ``module`` and forget it.

    Raises:
        KeyError: no such patch is registered.
    """
    with _lock:
        if name not in _patches.get(module, {}):
            raise KeyError(f"no patch {name!r} registered for module {module!r}")
        del _patches[module][name]
        if not _patches[module]:
            del _patches[module]
        for ref, patch_name, _token in reversed(list(_journal)):
            mod = ref()
            if mod is not None and mod.__name__ == module and patch_name == name:
                _undo_one(mod, patch_name)


def register_fallback(
    module: str,
    factory: Callable[[ModuleType], None],
    *,
    description: str = "",
    is_package: bool = False,
    owner: str | None = None,
) -> None:
    """Serve a stand-in for ``module`` only when no other finder can import the real one.

    ``factory(module_object)`` fills the new module's namespace at import. The stand-in's
    modules carry ``__lpcam_fallback__ = True``.

    Args:
        module: Full module name (``"chainercv.datasets"``).
        factory: Fills the module namespace.
        description: One line for ``--explain``.
        is_package: The module has submodules (served by their own fallbacks).
        owner: Registering module (default: the caller's module).
    """
    if owner is None:
        owner = sys._getframe(1).f_globals.get("__name__", "")
    with _lock:
        _fallbacks[module] = _Fallback(module, factory, description, is_package, owner)
        install()


# --------------------------------------------------------------------------- application


def _module_key(mod: ModuleType) -> str:
    # A module executed as a script is registered under __main__/__mp_main__ but keeps the
    # spec name; patches target the importable name.
    spec = getattr(mod, "__spec__", None)
    return getattr(spec, "name", None) or mod.__name__


def apply_patches(module: ModuleType) -> list[str]:
    """Apply the registered, not yet applied patches of ``module`` (in registration order).

    Returns:
        Names of the patches applied by this call.

    Raises:
        PatchError: a patch function raised; the patches applied before it stay applied.
    """
    done: list[str] = []
    with _lock:
        patches = list(_patches.get(_module_key(module), {}).values())
        if not patches:
            return done
        record = _applied.setdefault(module, {})
        for patch in patches:
            if patch.before_exec or patch.name in record:
                continue
            missing = [a for a in patch.requires if not hasattr(module, a)]
            if missing:
                skipped = _skipped.setdefault(module, set())
                if patch.name not in skipped:
                    skipped.add(patch.name)
                    logger.warning(
                        "patch %s:%s not applied: module %s lacks %s (another project's module?)",
                        patch.module, patch.name, getattr(module, "__file__", module), missing,
                    )
                continue
            try:
                undo = patch.fn(module)
            except Exception as err:
                raise PatchError(f"patch {patch.module}:{patch.name} ({patch.owner}) failed: {err}") from err
            if undo is not None and not callable(undo):
                raise PatchError(f"patch {patch.module}:{patch.name} returned {undo!r}, not an undo callable")
            token = object()
            record[patch.name] = undo
            _journal.append((weakref.ref(module), patch.name, token))
            done.append(patch.name)
            logger.debug("patched %s:%s", patch.module, patch.name)
    return done


def applied_patches(module: ModuleType) -> list[str]:
    """Names of the patches currently applied to this module object."""
    with _lock:
        return list(_applied.get(module, {}))


def _undo_one(module: ModuleType, name: str) -> None:
    record = _applied.get(module)
    if record is None or name not in record:
        return
    undo = record.pop(name)
    _journal[:] = [e for e in _journal if not (e[0]() is module and e[1] == name)]
    if undo is not None:
        try:
            undo()
        except Exception:  # pragma: no cover - keep undoing the rest
            logger.exception("undoing patch %s:%s failed", module.__name__, name)


def _forget(module: ModuleType) -> None:
    """Drop the records of a module object whose code is being re-executed (reload)."""
    _applied.pop(module, None)
    _skipped.pop(module, None)
    _journal[:] = [e for e in _journal if e[0]() is not module]


def _run_before_exec(module: ModuleType) -> list[Undo]:
    undos: list[Undo] = []
    with _lock:
        patches = [p for p in _patches.get(_module_key(module), {}).values() if p.before_exec]
    for patch in patches:
        try:
            undo = patch.fn(module)
        except Exception as err:
            for u in reversed(undos):
                u()
            raise PatchError(f"patch {patch.module}:{patch.name} ({patch.owner}) failed: {err}") from err
        if undo is not None:
            undos.append(undo)
    return undos


# --------------------------------------------------------------------------- finder / loaders


class _PatchingLoader(importlib.abc.Loader):
    """Wraps a module's real loader: executes the module, then applies its patches."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        # Module attributes point at the real loader (inspect, linecache, reload see no wrapper).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        with _lock:
            _forget(module)
        temporary = _run_before_exec(module)
        try:
            self._loader.exec_module(module)
        finally:
            for undo in reversed(temporary):
                undo()
        apply_patches(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self._loader, name)


class _FallbackLoader(importlib.abc.Loader):
    def __init__(self, fallback: _Fallback) -> None:
        self._fallback = fallback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        setattr(module, _FALLBACK_ATTR, True)
        self._fallback.factory(module)
        with _lock:
            _served_fallbacks.append(module.__name__)
        logger.info("%s is not installed: using lpcam's stand-in (%s)", module.__name__,
                    self._fallback.description or self._fallback.owner)


class _PatchFinder(importlib.abc.MetaPathFinder):
    """First entry of ``sys.meta_path``: wraps the loader of modules that have patches."""

    _lpcam_hook = True

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        with _lock:
            patched = fullname in _patches
            fallback = _fallbacks.get(fullname)
        if not patched and fallback is None:
            return None
        busy: set[str] = _local.__dict__.setdefault("busy", set())
        if fullname in busy:
            return None
        busy.add(fullname)
        try:
            spec = self._find_real(fullname, path, target)
        finally:
            busy.discard(fullname)
        if spec is None:
            if fallback is None:
                return None
            return importlib.util.spec_from_loader(fullname, _FallbackLoader(fallback), is_package=fallback.is_package)
        if patched and spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
            spec.loader = _PatchingLoader(spec.loader)
        return spec

    def _find_real(self, fullname: str, path: Any, target: ModuleType | None) -> importlib.machinery.ModuleSpec | None:
        for finder in list(sys.meta_path):
            if getattr(finder, "_lpcam_hook", False):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def invalidate_caches(self) -> None:  # importlib.invalidate_caches() calls every finder
        return None


_finder = _PatchFinder()


def is_installed() -> bool:
    """Whether the import hook is in ``sys.meta_path``."""
    return any(f is _finder for f in sys.meta_path)


def installed(module: str) -> bool:
    """Whether the real top-level ``module`` can be imported: lpcam's stand-ins (:func:`register_fallback`),
    which ``importlib.util.find_spec`` reports too, do not count."""
    return _finder._find_real(module, None, None) is not None


def install() -> None:
    """Put the hook first in ``sys.meta_path`` (idempotent) and patch modules already imported."""
    with _lock:
        # A stale finder from an earlier copy of this module (reload) would double-wrap.
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_lpcam_hook", False) or f is _finder]
        if not is_installed():
            sys.meta_path.insert(0, _finder)
        for name in list(_patches):
            mod = sys.modules.get(name)
            if mod is not None:
                apply_patches(mod)


def uninstall(*, undo: bool = True) -> None:
    """Remove the hook; with ``undo`` also restore every patched module and drop stand-ins.

    The registry is kept: :func:`install` re-applies it to imported modules.
    """
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if f is not _finder]
        if undo:
            _undo_since(0)
            _drop_fallback_modules(0)


def _undo_since(mark: int) -> None:
    for ref, name, _token in reversed(_journal[mark:]):
        mod = ref()
        if mod is not None:
            _undo_one(mod, name)
    del _journal[mark:]


def _drop_fallback_modules(mark: int) -> None:
    for name in reversed(_served_fallbacks[mark:]):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, _FALLBACK_ATTR, False):
            del sys.modules[name]
            parent, _, child = name.rpartition(".")
            if parent and parent in sys.modules and getattr(sys.modules[parent], child, None) is mod:
                delattr(sys.modules[parent], child)
    del _served_fallbacks[mark:]


@contextmanager
def scoped() -> Iterator[None]:
    """Everything registered or applied inside the block is undone on exit (for tests).

    Restores the registry, undoes the patches applied in the block (in reverse order), removes
    the stand-in modules served in the block from ``sys.modules`` and puts the hook back in or
    out of ``sys.meta_path`` as it was.
    """
    with _lock:
        saved_patches = {m: dict(p) for m, p in _patches.items()}
        saved_fallbacks = dict(_fallbacks)
        journal_mark = len(_journal)
        fallback_mark = len(_served_fallbacks)
        was_installed = is_installed()
    try:
        yield
    finally:
        with _lock:
            _undo_since(min(journal_mark, len(_journal)))
            _drop_fallback_modules(min(fallback_mark, len(_served_fallbacks)))
            _patches.clear()
            _patches.update(saved_patches)
            _fallbacks.clear()
            _fallbacks.update(saved_fallbacks)
            if was_installed:
                install()
            else:
                sys.meta_path[:] = [f for f in sys.meta_path if f is not _finder]


# --------------------------------------------------------------------------- reporting


def describe_patches(module_prefix: str | None = None) -> list[PatchInfo]:
    """Every registered patch and stand-in, with its status (for ``--explain``).

    Args:
        module_prefix: Only modules whose name starts with this.
    """
    out: list[PatchInfo] = []
    with _lock:
        for module, patches in _patches.items():
            if module_prefix and not module.startswith(module_prefix):
                continue
            loaded = sys.modules.get(module)
            for patch in patches.values():
                if patch.before_exec:
                    status = "applied at import" if loaded is not None else "pending"
                elif loaded is None:
                    status = "pending"
                elif patch.name in _applied.get(loaded, {}):
                    status = "applied"
                elif patch.name in _skipped.get(loaded, set()):
                    status = "skipped"
                else:
                    status = "not applied"
                out.append(PatchInfo(module, patch.name, patch.description, status, patch.owner))
        for module, fb in _fallbacks.items():
            if module_prefix and not module.startswith(module_prefix):
                continue
            loaded = sys.modules.get(module)
            if loaded is None:
                status = "inactive (used only if missing)"
            elif getattr(loaded, _FALLBACK_ATTR, False):
                status = "active (real module missing)"
            else:
                status = "inactive (real module imported)"
            out.append(PatchInfo(module, "<stand-in>", fb.description, status, fb.owner))
    return out


def explain(module_prefix: str | None = None) -> str:
    """A readable table of :func:`describe_patches`."""
    rows = describe_patches(module_prefix)
    if not rows:
        return "no lpcam patches registered"
    width = max(len(f"{r.module}:{r.name}") for r in rows)
    status_width = max(len("status"), *(len(r.status) for r in rows))
    lines = [f"{'patch':<{width}}  {'status':<{status_width}}  what it changes"]
    for r in rows:
        lines.append(f"{r.module + ':' + r.name:<{width}}  {r.status:<{status_width}}  {r.description}")
    return "\n".join(lines)


def module_proxy(base: ModuleType, why: str, **attributes: Any) -> ModuleType:
    """A copy of ``base``'s namespace with ``attributes`` set: what one host module sees in place of
    ``base`` (numpy with its old aliases, torch with a CPU ``load``), marked ``__lpcam_proxy__ = why``."""
    proxy = ModuleType(base.__name__, base.__doc__)
    proxy.__dict__.update(base.__dict__)
    proxy.__dict__.update(attributes, __lpcam_proxy__=why)
    return proxy
