"""Text sources chosen by config: local files/globs, the interpreter's pydoc topics, HF datasets.

Every source returns one string; documents are joined with blank lines (the form in which the
GPTQ/AWQ/Wanda papers evaluate WikiText-2).
"""

from __future__ import annotations

import glob
import os

SOURCES = ("pydoc", "file", "hf")


def pydoc_text() -> str:
    """The interpreter's own ``pydoc_data.topics`` (help() topics): offline on every Python."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def file_text(pattern: str) -> str:
    if not pattern:
        raise ValueError("data.path is empty: give a file or a glob for source='file'")
    paths = (
        sorted(glob.glob(os.path.expanduser(pattern)))
        if any(c in pattern for c in "*?[")
        else [pattern]
    )
    if not paths:
        raise FileNotFoundError(f"data.path {pattern!r} matches no file")
    texts = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"data.path: no such file {p!r}")
        with open(p, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def hf_text(name: str, config: str = "", split: str = "test", field: str = "text") -> str:
    """A Hugging Face ``datasets`` split (needs network and ``pip install datasets``)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("source='hf' needs `pip install datasets` (extra: shrinkjax[hf])") from e
    ds = datasets.load_dataset(name, config or None, split=split)
    if field not in ds.column_names:
        raise KeyError(f"dataset {name} has no field {field!r}; fields: {ds.column_names}")
    return "\n\n".join(ds[field])


def load_text(
    source: str,
    path: str = "",
    hf_name: str = "",
    hf_config: str = "",
    hf_split: str = "test",
    hf_field: str = "text",
) -> str:
    if source == "pydoc":
        return pydoc_text()
    if source == "file":
        return file_text(path)
    if source == "hf":
        return hf_text(hf_name, hf_config, hf_split, hf_field)
    raise ValueError(f"unknown data source {source!r}; known: {', '.join(SOURCES)}")


def shared_data_dir(explicit: str = "", root: str = "") -> str:
    """The shared corpora folder (holding ``wikitext-2-raw/test.txt``): ``explicit``, else
    ``$SHRINKJAX_DATA``, else ``../shared/data`` beside the checkout ``root``, else ``.gpu_data``
    inside it (the copy carried to a lent GPU machine)."""
    import os

    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cands = [
        explicit,
        os.environ.get("SHRINKJAX_DATA", ""),
        os.path.join(root, "..", "shared", "data"),
        os.path.join(root, ".gpu_data"),
    ]
    for cand in cands:
        if cand and os.path.isfile(os.path.join(cand, "wikitext-2-raw", "test.txt")):
            return os.path.abspath(cand)
    raise FileNotFoundError(
        f"WikiText-2 (wikitext-2-raw/test.txt) not found in any of {[c for c in cands if c]}: "
        "pass a data dir or set SHRINKJAX_DATA"
    )
