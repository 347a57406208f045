"""Where the tests find the real data, which is never committed.

``$FEDBUS_DATA`` (the PneumoniaMNIST .npz, as for ``fedbus demo``) wins; its folder is
also where ``kermany-sample/`` is looked for. Otherwise the data lies in ``shared/data``
beside the checkout, as on the project's machines.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("FEDBUS_DATA"):
    PNEUMONIAMNIST = Path(os.environ["FEDBUS_DATA"]).resolve()
    DATA_DIR = PNEUMONIAMNIST.parent
else:
    DATA_DIR = REPO.parent / "shared" / "data"
    PNEUMONIAMNIST = DATA_DIR / "pneumoniamnist.npz"
KERMANY_SAMPLE = DATA_DIR / "kermany-sample"
