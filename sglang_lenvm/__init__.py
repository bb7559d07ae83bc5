"""sglang-lenvm: token-level length control for LLM serving, built into SGLang."""

__version__ = "0.1.0"


def _alias_checkout_kernels() -> None:
    # The repository's top-level kernels/ directory is this package's `kernels` subpackage:
    # a wheel installs it at sglang_lenvm/kernels (pyproject's package-dir mapping). It has no
    # __init__.py on purpose: PyPI already has a package named `kernels` that sglang imports,
    # and a regular package in the checkout root would shadow it for anything run from there.
    # Without an __init__.py the editable finder cannot map it, so a source checkout (editable
    # install, or running from the repo root) points the subpackage at the directory here.
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    name = __name__ + ".kernels"
    if name in sys.modules or any((Path(p) / "kernels").is_dir() for p in __path__):
        return
    checkout = Path(__file__).resolve().parent.parent / "kernels"
    if checkout.is_dir():
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(checkout)]
        sys.modules[name] = importlib.util.module_from_spec(spec)


_alias_checkout_kernels()
