"""Turn the DART JSON (../shared/data/dart/...) into the JSONL task format: one domain ("source") per task.

  python experiments/dart_to_jsonl.py ../shared/data/dart/dart-v1.1.1-dev-without-webnlg.json runs/dart.jsonl

Each annotation becomes ``{"task": <annotation source>, "text": "<triples> = <sentence>"}``, so a language model
learns to verbalize a table row in the style of its source; the five sources of the file are the tasks.
"""

import json
import sys
from pathlib import Path


def convert(src: Path, dst: Path) -> int:
  rows = json.loads(src.read_text())
  n = 0
  with dst.open("w") as f:
    for row in rows:
      triples = " | ".join(" : ".join(t) for t in row["tripleset"])
      for ann in row["annotations"]:
        f.write(json.dumps({"task": ann["source"], "text": f"{triples} = {ann['text']}"}) + "\n")
        n += 1
  return n


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  out = Path(sys.argv[2])
  out.parent.mkdir(parents=True, exist_ok=True)
  print(f"wrote {convert(Path(sys.argv[1]), out)} texts to {out}")
