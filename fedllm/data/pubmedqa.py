"""PubMedQA (PQA-L, Jin et al. 2019, MIT) as a natural four-hospital federation.

Sites by patient population from MeSH terms, first match wins (see the data folder's README):
pediatric, geriatric, adult, other. Task: prompt = abstract contexts + question, response =
``final_decision`` then ``LONG_ANSWER``; the loss is on the response only.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.errors import DataError

SITE_MESH = (
    ("pediatric", ("Infant", "Infant, Newborn", "Child", "Child, Preschool", "Adolescent")),
    ("geriatric", ("Aged", "Aged, 80 and over")),
    ("adult", ("Adult", "Middle Aged", "Young Adult")),
)
SITES = ("pediatric", "geriatric", "adult", "other")
SOURCE_FILE = "ori_pqal.json"


def site_of(meshes: list[str]) -> str:
    """The population site a record belongs to (first match wins)."""
    terms = {m.strip() for m in meshes}
    for site, wanted in SITE_MESH:
        if terms.intersection(wanted):
            return site
    return "other"


def pubmedqa_site_records(folder: Path) -> dict[str, list[dict]]:
    """``{site: [instruction records]}`` from the shared PubMedQA folder."""
    path = Path(folder) / SOURCE_FILE
    if not path.is_file():
        raise DataError(
            f"PubMedQA data not found at {path}. The pubmedqa scenario reads the shared copy in "
            "../shared/data/pubmedqa/ beside the repository (or the folder in "
            "$FEDLLM_PUBMEDQA_DIR); it is never downloaded. Use the demo scenario instead."
        )
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    sites: dict[str, list[dict]] = {s: [] for s in SITES}
    for pmid, rec in sorted(data.items()):
        try:
            contexts = "\n".join(rec["CONTEXTS"])
            record = {  # context first: truncation drops the start of the prompt, never the question
                "instruction": f"Context:\n{contexts}\n\nQuestion: {rec['QUESTION']}\n"
                               "Answer yes, no or maybe, then explain briefly.",
                "output": f"{rec['final_decision']}. {rec['LONG_ANSWER']}",
            }
            sites[site_of(rec.get("MESHES", []))].append(record)
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}: record {pmid}: missing or malformed field {exc}") from None
    return sites
