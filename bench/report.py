"""Turn a pytest-benchmark JSON file into a markdown table: per group, time and ratio to the baseline."""
from __future__ import annotations

import json
import platform
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b.get("group") or b["name"]].append(b)
    mi = data.get("machine_info", {})
    extra = data["benchmarks"][0].get("extra_info", {}) if data["benchmarks"] else {}
    print(f"machine: {mi.get('cpu', {}).get('brand_raw', platform.processor())}, "
          f"{mi.get('cpu', {}).get('count', '?')} cores, python {mi.get('python_version', '?')}, "
          f"torch {extra.get('torch', '?')}, device {extra.get('device', '?')}; date {data.get('datetime', '')[:10]}")
    print()
    print("| group | variant | median (ms) | ratio to baseline |")
    print("|---|---|---:|---:|")
    for group, rows in groups.items():
        base = next((r for r in rows if r.get("extra_info", {}).get("baseline")), None)
        for r in sorted(rows, key=lambda r: (not r.get("extra_info", {}).get("baseline"), r["name"])):
            med = r["stats"]["median"] * 1e3
            ratio = "baseline" if r is base else (f"{r['stats']['median'] / base['stats']['median']:.3f}x" if base else "")
            name = r.get("extra_info", {}).get("variant", r["name"])
            print(f"| {group} | {name} | {med:.3f} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
