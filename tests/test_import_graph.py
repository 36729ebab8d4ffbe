"""No import cycles among the package's modules, and nothing inside it imports ``api``.

The graph: ``python -m coreselect.devtools.imports`` (built with ``ast``, nothing imported).
"""

from __future__ import annotations

from coreselect.devtools.imports import cycles, graph


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_graph_sees_lazy_imports():
    g = graph()
    assert "coreselect.data.hf_datasets" in g["coreselect.data.readers"]  # imported inside a function
    assert "coreselect.methods.registry" in g["coreselect.methods.trim"]


def test_nothing_in_the_package_imports_api():
    g = graph()
    users = sorted(m for m, deps in g.items() if "coreselect.api" in deps)
    assert users == []
