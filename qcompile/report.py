"""Reports as JSON: one encoder for the compile report, `validate`, `inspect`, `formats` and bench."""
from __future__ import annotations

import json
import math
from pathlib import Path


def to_json(obj) -> str:
    """JSON text; non-finite floats become "inf" / "-inf" (NaN -> null), numpy scalars and paths plain values."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, Path):
            return str(x)
        if hasattr(x, "item"):
            return clean(x.item())
        return x

    return json.dumps(clean(obj), indent=1)
