"""Out-of-distribution English text for the loss-by-position comparison (the paper's Figure 8).

The paper measures models trained on children's stories on Simple English Wikipedia. Wikipedia
cannot be downloaded on the machines that build this project, so the default set is one that every
Python installation carries: the prose of Python's own reference documentation, shipped as
`pydoc_data.topics` (the text `help("if")` shows). It is English written for adults about
programming: a vocabulary, register and topic that TinyStories never shows, yet plain sentences
that a story model can partly read. Indented blocks (grammar rules, code examples, tables) are
dropped so that what remains is prose.

Users who have Simple English Wikipedia can pass a local file instead: a text file (articles
separated by `<|endoftext|>` lines or blank lines), a .jsonl file with a `text` field, or a folder
of those (see `memory_mosaics.data.corpora`).
"""

from __future__ import annotations

from pathlib import Path

from memory_mosaics.errors import MosaicError

PYTHON_DOCS = "python-docs"


def _prose_paragraphs(text: str) -> list[str]:
    """The unindented paragraphs of a pydoc topic, with their line breaks joined into spaces."""
    paragraphs, current = [], []
    for line in text.splitlines():
        if not line.strip() or line.startswith((" ", "\t")):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if set(line.strip()) <= set("*=-~^"):  # the underline of a section title
            current = []
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    # A title line has no final punctuation; a prose paragraph ends a sentence.
    return [p for p in paragraphs if p.endswith((".", ":", "?", "!")) and len(p.split()) >= 8]


def python_docs_documents() -> list[str]:
    """One document per topic of Python's reference documentation (its prose only), sorted by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split it out of the standard library
        raise MosaicError(
            "this Python has no pydoc_data module (the reference documentation topics); install the full "
            "standard library (e.g. Debian's libpython3-stdlib) or pass --ood FILE"
        ) from None
    documents = []
    for name in sorted(topics):
        paragraphs = _prose_paragraphs(topics[name])
        if paragraphs:
            documents.append("\n".join(paragraphs))
    return documents


def open_file_corpus(path: str | Path):
    """A local corpus file or folder, e.g. a Simple English Wikipedia dump as text; opened, not read
    (a missing, empty or foreign path is refused here)."""
    from memory_mosaics.data import open_corpus

    path = Path(path)
    if not path.exists():
        raise MosaicError(f"--ood {path} does not exist; pass {PYTHON_DOCS} or a text/jsonl file or folder")
    return open_corpus(str(path))


def file_documents(path: str | Path) -> list[str]:
    """Documents of a local corpus file or folder."""
    return list(open_file_corpus(path).documents())


def check_ood(spec: str) -> None:
    """Refuse a bad --ood before a run writes anything, without reading a local corpus through."""
    if spec == PYTHON_DOCS:
        python_docs_documents()
    else:
        open_file_corpus(spec)


def ood_documents(spec: str) -> tuple[str, list[str]]:
    """(description, documents) for `spec`: python-docs or a local path."""
    if spec == PYTHON_DOCS:
        import sys

        version = ".".join(map(str, sys.version_info[:3]))
        return f"Python {version} reference documentation prose (pydoc_data.topics)", python_docs_documents()
    return f"local corpus {spec}", file_documents(spec)
