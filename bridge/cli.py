"""The `bridge` command (a first version: the version and the graph of formats)."""

from __future__ import annotations

import bridge


def main() -> None:
    print(f"bridge {bridge.__version__}")
    print("formats:")
    for name, fmt in sorted(bridge.formats().items()):
        print(f"  {name:10} {fmt.description}")
    print("conversions:")
    for edge in bridge.conversions():
        print(f"  {edge}")
