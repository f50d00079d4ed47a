"""CI: the QR neurons of two runs of the same locate (locked vs latest dependencies) must be the same.

Usage: python .ci/compare_neurons.py A/neurons.json B/neurons.json
Exits 1 and names the queries whose neuron sets differ.
"""

from __future__ import annotations

import json
import sys


def neuron_sets(path: str) -> dict[str, set[tuple[int, int]]]:
    doc = json.load(open(path))
    return {q: {(int(r[0]), int(r[1])) for r in v["qr_neurons"]} for q, v in doc["queries"].items()}


def main() -> int:
    a, b = (neuron_sets(p) for p in sys.argv[1:3])
    if set(a) != set(b):
        print(f"the runs hold different queries: {sorted(set(a) ^ set(b))}")
        return 1
    differ = {q: (len(a[q] & b[q]), len(a[q] | b[q])) for q in a if a[q] != b[q]}
    total = sum(len(s) for s in a.values())
    print(f"{len(a)} queries, {total} QR neurons; queries whose sets differ: {len(differ)}")
    for q, (inter, union) in sorted(differ.items()):
        print(f"  {q}: {inter} shared of {union}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
