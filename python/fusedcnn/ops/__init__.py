"""The ops: one module per layer family (backend dispatch, torch.library registration, the public functionals).

Every module here not starting with "_" is a layer family; importing fusedcnn.ops loads them all, so adding a
family means adding its module, with no list to edit. FAMILIES names them (sorted), for train and benchmarks.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from fusedcnn.ops import _registry

FAMILY_MODULES = {name: _importlib.import_module(f"{__name__}.{name}")
                  for _, name, _ in sorted(_pkgutil.iter_modules(__path__)) if not name.startswith("_")}
FAMILIES = _registry.families()
assert set(FAMILIES) == set(FAMILY_MODULES), "each ops module registers one family named like the module"
