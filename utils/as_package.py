"""Makes the package `utils` importable for a script in utils/ run by its path (`python utils/merge.py`).

Run so, Python puts utils/ itself first on sys.path, not the repository root, so `import utils.records` would
fail. Such a script imports this module by its top-level name in that case only:

    if not __package__:  # python utils/merge.py: makes utils importable
        import as_package  # noqa: F401

and this module registers utils/ as the package `utils` by its location, leaving sys.path alone.
`python -m utils.merge` and imports from elsewhere do not need it.
"""
import importlib.util
import os
import sys


def register_utils():
    folder = os.path.dirname(os.path.abspath(__file__))
    if getattr(sys.modules.get("utils"), "__path__", None) == [folder]:
        return  # already imported from here
    spec = importlib.util.spec_from_file_location("utils", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules["utils"] = package
    spec.loader.exec_module(package)


register_utils()
