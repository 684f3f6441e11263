"""Print the README's encoder table (markdown) from the registry: `python scripts/encoder_table.py`."""

from __future__ import annotations

from atlaspatch_stream.backends.encoders.registry import describe_encoders


def main() -> None:
    """One row per encoder name."""
    print("| name | dim | input | extra | licence | gated | weights from |")
    print("|---|---|---|---|---|---|---|")
    for r in describe_encoders():
        extra = r["extra"] or "core"
        gated = "yes" if r["gated"] else "no"
        print(f"| `{r['name']}` | {r['dim']} | {r['input_size']} | {extra} | {r['licence']} | {gated} | "
              f"{r['weights_source']} |")


if __name__ == "__main__":
    main()
