"""What names a routing target: a pack's language code, or `resident` (the resident alone).

Shared by the router, the engines, pack building and metrics, which must agree on it.
"""

from __future__ import annotations

import re

RESIDENT = "resident"
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})?$")  # sw, ja, pt-BR, zh_Hant
