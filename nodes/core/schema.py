"""The pack's node schemas: one category, and the words a user types into the node search.

ComfyUI's node search (frontend 1.35, with v0.8.0) matches the node id and the
display name only, so every display name starts with the word users type for this
method, "Personalization", and the ids start with "PG_". Newer ComfyUI schemas
(0.33) also take ``search_aliases``, which the search matches as well: the method's
other names and the terms of its inputs. A version without that field gets the
schema without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from comfy_api.latest import io

CATEGORY = "sampling/personalization guidance"
TUNING_CATEGORY = f"{CATEGORY}/tuning"

# Words for every node of the pack: the method's names and what it works on.
PACK_ALIASES = (
    "personalization guidance",
    "personalized",
    "steering guidance",
    "PG",
    "DreamBooth",
    "LoRA",
    "fine-tuned",
    "subject",
)

SEARCH_ALIASES = "search_aliases" in {field.name for field in dataclasses.fields(io.Schema)}


def node_schema(*, search_aliases: Sequence[str] = (), **fields) -> io.Schema:
    """``io.Schema(**fields)``, with the pack's search words and ``search_aliases`` where ComfyUI has the field."""
    if SEARCH_ALIASES:
        fields["search_aliases"] = list(dict.fromkeys((*search_aliases, *PACK_ALIASES)))
    return io.Schema(**fields)
