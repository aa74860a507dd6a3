"""Ids of the documents of one corpus that overlap another, for `prepare --exclude-from`.

Training on a corpus that holds copies of an evaluation corpus would score memory, not retrieval: FOLDOC carries
about 1,500 entries taken from the Jargon File. A document counts as overlapping when its title is one of the other
corpus's titles, when it names the other corpus (--mention), or when more than --max-shared of its word 8-grams
occur in the other corpus. The ids go to stdout; a summary, with the share of the other corpus's 8-grams that the
kept documents still contain, goes to stderr as JSON.

Usage: python scripts/reproduce/overlapping_ids.py CORPUS.jsonl.gz --against OTHER.jsonl.gz [--mention TEXT] > ids.txt
"""

import argparse
import json
import re
import sys

from flashback.text.corpus import read_documents

N = 8


def grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + N]) for i in range(len(words) - N + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("--against", required=True, help="the corpus to keep out (an evaluation corpus)")
    parser.add_argument("--mention", action="append", default=[], help="a phrase that marks a copy (repeatable)")
    parser.add_argument("--max-shared", type=float, default=0.02, help="most 8-grams a kept document may share")
    args = parser.parse_args()

    other = list(read_documents([args.against]))
    titles = {doc.title.lower() for doc in other if doc.title}
    other_grams = set().union(*(grams(doc.text) for doc in other))
    mentions = [m.lower() for m in args.mention]
    kept_grams: set = set()
    dropped = kept = 0
    for doc in read_documents([args.corpus]):
        own = grams(doc.text)
        text = doc.text.lower()
        if (
            (doc.title or "").lower() in titles
            or any(m in text for m in mentions)
            or (own and len(own & other_grams) / len(own) > args.max_shared)
        ):
            print(doc.id)
            dropped += 1
        else:
            kept += 1
            kept_grams |= own & other_grams
    summary = {"dropped": dropped, "kept": kept, "other_8grams_left": round(len(kept_grams) / len(other_grams), 5)}
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
