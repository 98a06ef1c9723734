"""Importing rwp_kernels from a source checkout: the subpackage that setup.py installs from another folder.

setup.py installs ``python_api/`` as ``rwp_kernels.optim``. An installed package (regular or editable) has
that mapping; a checkout imported directly (its root on ``sys.path``, as when a command runs from the
clone's root and the checkout's ``rwp_kernels/`` shadows the installed one) does not. This finder gives
the checkout the same mapping, so the whole package then comes from the checkout.
"""
import importlib.util
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
MAPPED = {"rwp_kernels.optim": CHECKOUT / "python_api"}


class CheckoutFinder:
    """A meta path finder for the packages of ``MAPPED``; asked only after the regular finders failed."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        folder = MAPPED.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install() -> None:
    """Add the finder (once) where this package is a checkout: the mapped folders sit beside it."""
    if all((folder / "__init__.py").is_file() for folder in MAPPED.values()) and CheckoutFinder not in sys.meta_path:
        sys.meta_path.append(CheckoutFinder)
