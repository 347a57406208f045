"""Reading a director's progress from its state dir (status.json + rounds.jsonl).

The director rewrites status.json atomically at every stage change and appends one checksummed
line to rounds.jsonl per completed round (node.roundlog), so a reader never sees a torn file:
`fedbus status` and the demo's progress bar read them without talking to the bus.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from node.roundlog import ROUNDS_LOG, read_records

STATUS_FILE = "status.json"

__all__ = ["ROUNDS_LOG", "STATUS_FILE", "format_status", "read_records", "read_status"]


def read_status(state_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = Path(state_dir) / STATUS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no status yet (is a director running with this state_dir?)"
        )
    return json.loads(path.read_text()), read_records(state_dir)


def format_status(status: dict[str, Any], records: list[dict[str, Any]]) -> str:
    age = time.time() - float(status.get("updated", 0))
    lines = [
        f"federation {status.get('federation')}: round {status.get('round')}/"
        f"{status.get('rounds_total')}, stage {status.get('stage')}, "
        f"{'secure' if status.get('secure') else 'PLAIN (insecure)'} aggregation, "
        f"updated {age:.0f} s ago",
    ]
    if status.get("reason"):
        lines.append(f"stopped: {status['reason']}")
    envoys = status.get("envoys", {})
    online = [k for k, v in envoys.items() if v.get("online")]
    lines.append(f"envoys online {len(online)}/{len(envoys)}:")
    for name, e in envoys.items():
        refused = f"  REFUSED: {e['refused']}" if e.get("refused") else ""
        lines.append(
            f"  {name:20s} {'online ' if e.get('online') else 'OFFLINE'} "
            f"last seen {e.get('last_seen_s', 0):.1f} s ago  {e.get('stage', '')}{refused}"
        )
    if records:
        lines.append("rounds:")
        for r in records[-10:]:
            val = (r.get("metrics") or {}).get("val") or {}
            dropped = ",".join(r.get("dropped", [])) or "-"
            lines.append(
                f"  {r['round']:4d}  {len(r.get('survivors', []))} in, dropped {dropped:12s} "
                f"val acc {val.get('accuracy', float('nan')):.3f} auc "
                f"{val.get('auc', float('nan')):.3f}  {r.get('seconds', 0):.1f} s"
            )
    return "\n".join(lines)
