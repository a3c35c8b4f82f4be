"""ktjax's version: the one definition (pyproject.toml reads it)."""
__version__ = "0.1.0"


def version_text() -> str:
    """--version's line: ktjax's version and the jax and jaxlib it runs on (from their installed metadata: jax is
    not imported, so --version answers at once)."""
    from importlib import metadata

    found = []
    for dist in ("jax", "jaxlib"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} not installed")
    return f"ktjax {__version__} ({', '.join(found)})"
