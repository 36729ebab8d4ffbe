"""Developer tools (not used at run time): ``python -m coreselect.devtools.imports``."""
